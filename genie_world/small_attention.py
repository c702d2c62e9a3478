"""CPU kernels for the world model's small shapes (head dim 4-16, width 32-64), compiled on first
use; every entry point falls back to plain PyTorch ops where they cannot be used.

At these sizes PyTorch's CPU flash-attention kernel spends most of its time in per-block GEMM calls
with an inner dimension of 4, not in the score arithmetic (one 256-token spatial layer of the
world-model bench, 32 frames x 8 heads: ~30 ms forward and ~75 ms backward on one core), and the
rest of a transformer block is dozens of small elementwise ops. Here:

- ``attention(q, k, v, scale)`` / ``attention_packed(qkv)``: softmax(q k^T scale) v per (batch, head)
  over q [N, L, H, d], k/v [N, S, H, d] (any strides with a contiguous last dim, e.g. views of one
  packed projection) -> [N, L, H, d] contiguous, so the output projection reads it without a copy.
  One head's keys/values sit transposed in L1 and each query streams over them with 16-wide
  vectors (scores, max, exp, weighted sum); the backward recomputes the probabilities from the
  saved log-sum-exp, as flash attention does. ~3x flash's speed at head dim 4.
- ``frame_attention``: attention over time per (batch, patch, head) for the few frames of a clip or
  a KV window, vectorised over each patch's channels (a head's score is summed over its lanes by
  butterfly shuffles and stays broadcast over them).
- inference helpers (``torch.ops.genie_sima_attn``): ``add_rms`` (residual add + RMS norm in one
  pass), ``qk_prep`` (QK-norm + rotary embedding, the rotate-half as a lane shuffle), ``swiglu``,
  ``rowmax_excl`` (best code outside the level-constraint groups).

Same maths as the PyTorch ops, to float rounding (fp32 only). Built with
``torch.utils.cpp_extension`` and the system C++ compiler for the CPU it runs on, cached under
``~/.cache/torch_extensions`` (first use: ~20 s). Not used on other devices or dtypes, while
``torch.compile`` traces, where the build fails (a warning, then SDPA / PyTorch ops), or with
``GENIE_SIMA_ATTN_KERNEL=0``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings

import torch
import torch.nn.functional as F

KERNEL_HEAD_DIMS = (2, 4, 8, 16)

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <torch/library.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf splat(float x) { return vf{} + x; }
inline vf ld(const float* p) { vf r; std::memcpy(&r, p, sizeof(vf)); return r; }
inline void st(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf x) {
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float hmax(vf x) {
  v8 a1 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), a2 = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 a = a1 > a2 ? a1 : a2;
  v4 b1 = __builtin_shufflevector(a, a, 0, 1, 2, 3), b2 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  v4 b = b1 > b2 ? b1 : b2;
  float m1 = b[0] > b[2] ? b[0] : b[2], m2 = b[1] > b[3] ? b[1] : b[3];
  return m1 > m2 ? m1 : m2;
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); below -87.3 (and -inf) exactly 0, never a denormal.
inline vf vexp(vf x) {
  const vi tiny = x < splat(-87.3f);
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  const vf t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds x*log2(e) to an integer
  const vf nf = t - 12582912.0f;
  vi n;
  std::memcpy(&n, &t, sizeof(vf));
  n = n - 0x4B400000;
  x = x - nf * 0.693359375f;
  x = x - nf * -2.12194440e-4f;
  const vf z = x * x;
  vf y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  const vi e = (n + 127) << 23;
  vf p2;
  std::memcpy(&p2, &e, sizeof(vf));
  y = y * p2;
  return tiny ? splat(0.f) : y;
}

struct Head {  // one (batch, head): first rows and row strides
  const float* q; int64_t sq;
  const float* k; int64_t sk;
  const float* v; int64_t sv;
};

inline vf tail_bias(int64_t S) {  // 0 for the real keys of the last 16-key block, -inf for its padding
  vf b = splat(0.f);
  for (int i = S % W == 0 ? W : S % W; i < W; ++i) b[i] = NEG_INF;
  return b;
}

// [S rows of D] (row stride s) -> [D][Sp] times mul, zero-padded to Sp.
template <int D>
void transpose_in(const float* __restrict__ x, int64_t s, int64_t S, int64_t Sp, float mul, float* __restrict__ xt) {
  for (int64_t j = 0; j < S; ++j)
    for (int c = 0; c < D; ++c) xt[c * Sp + j] = x[j * s + c] * mul;
  for (int c = 0; c < D; ++c)
    for (int64_t j = S; j < Sp; ++j) xt[c * Sp + j] = 0.f;
}

// Scores of one query against all keys (kt: [D][Sp], keys pre-scaled) -> s[Sp]; returns their max.
template <int D>
inline float scores(const float* __restrict__ qi, const float* __restrict__ kt, int64_t Sp, const vf bias,
                    float* __restrict__ s) {
  vf qs[D];
  for (int c = 0; c < D; ++c) qs[c] = splat(qi[c]);
  vf mx = splat(NEG_INF);
  for (int64_t jb = 0; jb < Sp; jb += W) {
    vf acc = qs[0] * ld(kt + jb);
    for (int c = 1; c < D; ++c) acc += qs[c] * ld(kt + c * Sp + jb);
    if (jb + W == Sp) acc += bias;
    st(s + jb, acc);
    mx = vmax(mx, acc);
  }
  return hmax(mx);
}

// ---- forward: o = softmax(q k^T scale) v, lse = log-sum-exp of the scaled scores ----------------
constexpr int QB = 4;  // queries per pass over one head's keys (head dims >= 8)

// Head dims >= 8: QB queries share each load of keys (transposed) and value rows (a D-lane vector).
template <int D>
void fwd_head_rows(const Head& h, float* __restrict__ o, int64_t so, float* __restrict__ lse, int64_t L, int64_t S,
                   float scale, float* buf) {
  typedef float vd __attribute__((vector_size(D * sizeof(float))));
  const int64_t Sp = (S + W - 1) / W * W;
  float* kt = buf;           // [D][Sp] keys * scale
  float* vr = kt + D * Sp;   // [S][D] value rows
  float* s = vr + D * Sp;    // [QB][Sp] scores, then probabilities
  transpose_in<D>(h.k, h.sk, S, Sp, scale, kt);
  for (int64_t j = 0; j < S; ++j) std::memcpy(vr + j * D, h.v + j * h.sv, D * sizeof(float));
  const vf bias = tail_bias(S);
  for (int64_t i0 = 0; i0 < L; i0 += QB) {
    const int nq = (int)std::min<int64_t>(QB, L - i0);
    const float* q[QB];
    for (int u = 0; u < QB; ++u) q[u] = h.q + (i0 + std::min(u, nq - 1)) * h.sq;
    vf mx[QB];
    for (int u = 0; u < QB; ++u) mx[u] = splat(NEG_INF);
    for (int64_t jb = 0; jb < Sp; jb += W) {
      vf a[QB];
      for (int u = 0; u < QB; ++u) a[u] = splat(0.f);
      for (int c = 0; c < D; ++c) {
        const vf kc = ld(kt + c * Sp + jb);
        for (int u = 0; u < QB; ++u) a[u] += splat(q[u][c]) * kc;
      }
      for (int u = 0; u < QB; ++u) {
        if (jb + W == Sp) a[u] += bias;
        st(s + u * Sp + jb, a[u]);
        mx[u] = vmax(mx[u], a[u]);
      }
    }
    float m[QB], lsum[QB];
    vf l[QB], vm[QB];
    for (int u = 0; u < QB; ++u) { m[u] = hmax(mx[u]); vm[u] = splat(m[u]); l[u] = splat(0.f); }
    for (int64_t jb = 0; jb < Sp; jb += W)
      for (int u = 0; u < QB; ++u) {
        const vf p = vexp(ld(s + u * Sp + jb) - vm[u]);
        l[u] += p;
        st(s + u * Sp + jb, p);
      }
    vd oa[QB];
    for (int u = 0; u < QB; ++u) oa[u] = vd{};
    for (int64_t j = 0; j < S; ++j) {
      vd v;
      std::memcpy(&v, vr + j * D, sizeof(vd));
      for (int u = 0; u < QB; ++u) oa[u] += s[u * Sp + j] * v;
    }
    for (int u = 0; u < nq; ++u) {
      lsum[u] = hsum(l[u]);
      oa[u] *= 1.f / lsum[u];
      std::memcpy(o + (i0 + u) * so, &oa[u], sizeof(vd));
      if (lse) lse[i0 + u] = m[u] + std::log(lsum[u]);
    }
  }
}

template <int D>
void fwd_head(const Head& h, float* __restrict__ o, int64_t so, float* __restrict__ lse, int64_t L, int64_t S,
              float scale, float* buf) {
  if constexpr (D >= 8) {
    fwd_head_rows<D>(h, o, so, lse, L, S, scale, buf);
    return;
  }
  const int64_t Sp = (S + W - 1) / W * W;
  float* kt = buf;
  float* vt = kt + D * Sp;  // values: [D][Sp] for D < 8, rows [Sp][D] otherwise
  float* s = vt + D * Sp;
  transpose_in<D>(h.k, h.sk, S, Sp, scale, kt);
  if constexpr (D < 8) {
    transpose_in<D>(h.v, h.sv, S, Sp, 1.f, vt);
  } else {
    for (int64_t j = 0; j < S; ++j) std::memcpy(vt + j * D, h.v + j * h.sv, D * sizeof(float));
  }
  const vf bias = tail_bias(S);
  for (int64_t i = 0; i < L; ++i) {
    const float m = scores<D>(h.q + i * h.sq, kt, Sp, bias, s);
    const vf vm = splat(m);
    vf l = splat(0.f);
    float* oi = o + i * so;
    if constexpr (D < 8) {  // values transposed: D accumulators over key blocks, summed at the end
      vf oa[D];
      for (int c = 0; c < D; ++c) oa[c] = splat(0.f);
      for (int64_t jb = 0; jb < Sp; jb += W) {
        const vf p = vexp(ld(s + jb) - vm);
        l += p;
        for (int c = 0; c < D; ++c) oa[c] += p * ld(vt + c * Sp + jb);
      }
      const float lsum = hsum(l), inv = 1.f / lsum;
      for (int c = 0; c < D; ++c) oi[c] = hsum(oa[c]) * inv;
      if (lse) lse[i] = m + std::log(lsum);
    } else {  // value rows: one D-wide accumulator, p broadcast per key
      for (int64_t jb = 0; jb < Sp; jb += W) {
        const vf p = vexp(ld(s + jb) - vm);
        l += p;
        st(s + jb, p);
      }
      const float lsum = hsum(l), inv = 1.f / lsum;
      typedef float vd __attribute__((vector_size(D * sizeof(float))));
      vd oa[4] = {vd{}, vd{}, vd{}, vd{}};  // 4 chains: one FMA latency per key otherwise
      int64_t j = 0;
      for (; j + 4 <= S; j += 4)
        for (int u = 0; u < 4; ++u) {
          vd vr;
          std::memcpy(&vr, vt + (j + u) * D, sizeof(vd));
          oa[u] += s[j + u] * vr;
        }
      for (; j < S; ++j) {
        vd vr;
        std::memcpy(&vr, vt + j * D, sizeof(vd));
        oa[0] += s[j] * vr;
      }
      oa[0] = ((oa[0] + oa[1]) + (oa[2] + oa[3])) * inv;
      std::memcpy(oi, &oa[0], sizeof(vd));
      if (lse) lse[i] = m + std::log(lsum);
    }
  }
}

// ---- backward (flash-style: probabilities recomputed from lse) -------------------------------
template <int D>
void bwd_head_rows(const Head& h, const float* __restrict__ o, int64_t so, const float* __restrict__ g, int64_t sg,
                   const float* __restrict__ lse, float* __restrict__ dq, int64_t sdq, float* __restrict__ dk,
                   int64_t sdk, float* __restrict__ dv, int64_t sdv, int64_t L, int64_t S, float scale, float* buf);

// Head dims < 8: keys, values and their gradients transposed [D][Sp]; one query at a time.
template <int D>
void bwd_head(const Head& h, const float* __restrict__ o, int64_t so, const float* __restrict__ g, int64_t sg,
              const float* __restrict__ lse, float* __restrict__ dq, int64_t sdq, float* __restrict__ dk, int64_t sdk,
              float* __restrict__ dv, int64_t sdv, int64_t L, int64_t S, float scale, float* buf) {
  if constexpr (D >= 8) {
    bwd_head_rows<D>(h, o, so, g, sg, lse, dq, sdq, dk, sdk, dv, sdv, L, S, scale, buf);
  } else {
    const int64_t Sp = (S + W - 1) / W * W;
    float* kt = buf;           // [D][Sp] keys * scale
    float* vt = kt + D * Sp;   // [D][Sp] values
    float* dkt = vt + D * Sp;  // [D][Sp]
    float* dvt = dkt + D * Sp; // [D][Sp]
    transpose_in<D>(h.k, h.sk, S, Sp, scale, kt);
    transpose_in<D>(h.v, h.sv, S, Sp, 1.f, vt);
    std::memset(dkt, 0, sizeof(float) * 2 * D * Sp);
    const vf bias = tail_bias(S);
    for (int64_t i = 0; i < L; ++i) {
      const float* qi = h.q + i * h.sq;
      const float* gi = g + i * sg;
      const float* oi = o + i * so;
      float dd = 0.f;
      for (int c = 0; c < D; ++c) dd += gi[c] * oi[c];
      const vf vdd = splat(dd), vl = splat(lse[i]);
      vf qs[D], gs[D], qsc[D], dqa[D];
      for (int c = 0; c < D; ++c) {
        qs[c] = splat(qi[c]); gs[c] = splat(gi[c]); qsc[c] = splat(qi[c] * scale); dqa[c] = splat(0.f);
      }
      for (int64_t jb = 0; jb < Sp; jb += W) {
        vf sc = qs[0] * ld(kt + jb);
        vf dp = gs[0] * ld(vt + jb);
        for (int c = 1; c < D; ++c) {
          sc += qs[c] * ld(kt + c * Sp + jb);
          dp += gs[c] * ld(vt + c * Sp + jb);
        }
        if (jb + W == Sp) sc += bias;
        const vf p = vexp(sc - vl);
        const vf ds = p * (dp - vdd);
        for (int c = 0; c < D; ++c) {
          dqa[c] += ds * ld(kt + c * Sp + jb);
          st(dkt + c * Sp + jb, ld(dkt + c * Sp + jb) + ds * qsc[c]);
          st(dvt + c * Sp + jb, ld(dvt + c * Sp + jb) + p * gs[c]);
        }
      }
      float* dqi = dq + i * sdq;
      for (int c = 0; c < D; ++c) dqi[c] = hsum(dqa[c]);
    }
    for (int64_t j = 0; j < S; ++j)
      for (int c = 0; c < D; ++c) { dk[j * sdk + c] = dkt[c * Sp + j]; dv[j * sdv + c] = dvt[c * Sp + j]; }
  }
}

// Head dims >= 8: QB queries per pass; each key's gradient rows are loaded and stored once per pass.
template <int D>
void bwd_head_rows(const Head& h, const float* __restrict__ o, int64_t so, const float* __restrict__ g, int64_t sg,
                   const float* __restrict__ lse, float* __restrict__ dq, int64_t sdq, float* __restrict__ dk,
                   int64_t sdk, float* __restrict__ dv, int64_t sdv, int64_t L, int64_t S, float scale, float* buf) {
  typedef float vd __attribute__((vector_size(D * sizeof(float))));
  const int64_t Sp = (S + W - 1) / W * W;
  float* kt = buf;           // [D][Sp] keys * scale
  float* vt = kt + D * Sp;   // [D][Sp] values
  float* kr = vt + D * Sp;   // [Sp][D] key rows * scale
  float* dkr = kr + D * Sp;  // [Sp][D]
  float* dvr = dkr + D * Sp; // [Sp][D]
  float* pb = dvr + D * Sp;  // [QB][Sp] probabilities
  float* db = pb + QB * Sp;  // [QB][Sp] dp, then ds
  transpose_in<D>(h.k, h.sk, S, Sp, scale, kt);
  transpose_in<D>(h.v, h.sv, S, Sp, 1.f, vt);
  for (int64_t j = 0; j < S; ++j)
    for (int c = 0; c < D; ++c) kr[j * D + c] = h.k[j * h.sk + c] * scale;
  std::memset(dkr, 0, sizeof(float) * 2 * D * Sp);
  const vf bias = tail_bias(S);
  for (int64_t i0 = 0; i0 < L; i0 += QB) {
    const int nq = (int)std::min<int64_t>(QB, L - i0);
    const float *q[QB], *gq[QB];
    vf vdd[QB], vl[QB];
    vd qsc[QB], gv[QB], dqa[QB];
    for (int u = 0; u < QB; ++u) {
      const int64_t i = i0 + std::min(u, nq - 1);
      q[u] = h.q + i * h.sq;
      gq[u] = g + i * sg;
      const float* oi = o + i * so;
      float dd = 0.f;
      for (int c = 0; c < D; ++c) dd += gq[u][c] * oi[c];
      vdd[u] = splat(dd);
      vl[u] = splat(lse[i]);
      std::memcpy(&qsc[u], q[u], sizeof(vd));
      std::memcpy(&gv[u], gq[u], sizeof(vd));
      qsc[u] *= scale;
      dqa[u] = vd{};
    }
    for (int64_t jb = 0; jb < Sp; jb += W) {
      vf sc[QB], dp[QB];
      for (int u = 0; u < QB; ++u) { sc[u] = splat(0.f); dp[u] = splat(0.f); }
      for (int c = 0; c < D; ++c) {
        const vf kc = ld(kt + c * Sp + jb), vc = ld(vt + c * Sp + jb);
        for (int u = 0; u < QB; ++u) { sc[u] += splat(q[u][c]) * kc; dp[u] += splat(gq[u][c]) * vc; }
      }
      for (int u = 0; u < QB; ++u) {
        if (jb + W == Sp) sc[u] += bias;
        vf p = vexp(sc[u] - vl[u]);
        if (u >= nq) p = splat(0.f);  // padding queries of the last pass contribute nothing
        st(pb + u * Sp + jb, p);
        st(db + u * Sp + jb, p * (dp[u] - vdd[u]));
      }
    }
    for (int64_t j = 0; j < S; ++j) {
      vd kj, dkj, dvj;
      std::memcpy(&kj, kr + j * D, sizeof(vd));
      std::memcpy(&dkj, dkr + j * D, sizeof(vd));
      std::memcpy(&dvj, dvr + j * D, sizeof(vd));
      for (int u = 0; u < QB; ++u) {
        const float ds = db[u * Sp + j], p = pb[u * Sp + j];
        dqa[u] += ds * kj;
        dkj += ds * qsc[u];
        dvj += p * gv[u];
      }
      std::memcpy(dkr + j * D, &dkj, sizeof(vd));
      std::memcpy(dvr + j * D, &dvj, sizeof(vd));
    }
    for (int u = 0; u < nq; ++u) std::memcpy(dq + (i0 + u) * sdq, &dqa[u], sizeof(vd));
  }
  for (int64_t j = 0; j < S; ++j) {
    std::memcpy(dk + j * sdk, dkr + j * D, D * sizeof(float));
    std::memcpy(dv + j * sdv, dvr + j * D, D * sizeof(float));
  }
}

// ---- attention over a few frames per (batch, patch): q [B, T, P, D], k/v [B, S, P, D] ----------
// Vectorised over each patch's channels: a 16-lane vector holds 16/dh heads; a head's score is
// summed over its dh lanes by butterfly shuffles and stays broadcast over them, so softmax and the
// weighted sum are plain lane-wise ops. bias [Bb, T, S] (0 / -inf) or none; q pre-scaled.
template <int M> inline vf xsh(vf x) {
  return __builtin_shufflevector(x, x, 0 ^ M, 1 ^ M, 2 ^ M, 3 ^ M, 4 ^ M, 5 ^ M, 6 ^ M, 7 ^ M, 8 ^ M, 9 ^ M,
                                 10 ^ M, 11 ^ M, 12 ^ M, 13 ^ M, 14 ^ M, 15 ^ M);
}
template <int DH> inline vf group_sum(vf x) {
  if constexpr (DH >= 2) x += xsh<1>(x);
  if constexpr (DH >= 4) x += xsh<2>(x);
  if constexpr (DH >= 8) x += xsh<4>(x);
  if constexpr (DH >= 16) x += xsh<8>(x);
  return x;
}

constexpr int TMAX = 32;

struct Frames {  // [B, T, P, D] with a contiguous last dim
  const float* p; int64_t sb, st, sp;
  explicit Frames(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), st(t.stride(1)), sp(t.stride(2)) {}
  const float* at(int64_t b, int64_t t, int64_t q) const { return p + b * sb + t * st + q * sp; }
};
struct FramesOut {
  float* p; int64_t sb, st, sp;
  explicit FramesOut(at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), st(t.stride(1)), sp(t.stride(2)) {}
  float* at(int64_t b, int64_t t, int64_t q) const { return p + b * sb + t * st + q * sp; }
};

template <int DH>
struct Lanes {  // pick[j]: lanes i with i % DH == j; spread[j]: lane i <- lane (i / DH) * DH + j
  vi pick[DH], spread[DH];
  Lanes() {
    for (int j = 0; j < DH; ++j)
      for (int i = 0; i < W; ++i) { pick[j][i] = (i % DH == j) ? -1 : 0; spread[j][i] = (i / DH) * DH + j; }
  }
};

// In-place softmax over frames s of w[s * stride] (scores lane-broadcast per head).
template <int DH>
inline void softmax_frames(vf* w, int64_t S, int64_t stride) {
  vf mx = splat(NEG_INF);
  for (int64_t s = 0; s < S; ++s) mx = vmax(mx, w[s * stride]);
  vf l = splat(0.f);
  if constexpr (DH >= 2) {
    // A head's score fills its DH lanes: pack DH frames' scores into one vector (lane i from frame
    // i % DH), take one exp per pack, then spread each frame's values back over its heads' lanes.
    static const Lanes<DH> lanes;
    for (int64_t s0 = 0; s0 < S; s0 += DH) {
      vf packed = splat(NEG_INF);
      const int64_t n = std::min<int64_t>(DH, S - s0);
      for (int64_t j = 0; j < n; ++j) packed = lanes.pick[j] ? w[(s0 + j) * stride] - mx : packed;
      const vf e = vexp(packed);
      for (int64_t j = 0; j < n; ++j) {
        const vf x = __builtin_shuffle(e, lanes.spread[j]);
        w[(s0 + j) * stride] = x;
        l += x;
      }
    }
  } else {
    for (int64_t s = 0; s < S; ++s) { w[s * stride] = vexp(w[s * stride] - mx); l += w[s * stride]; }
  }
  const vf inv = 1.f / l;
  for (int64_t s = 0; s < S; ++s) w[s * stride] *= inv;
}

// Softmax weights of query frame t over the S key frames, lane-broadcast per head: w[s].
template <int DH>
inline void frame_weights(vf qt, const vf* kv, int64_t S, const float* bias_t, vf* w) {
  for (int64_t s = 0; s < S; ++s) {
    vf x = group_sum<DH>(qt * kv[s]);
    if (bias_t) x += bias_t[s];
    w[s] = x;
  }
  softmax_frames<DH>(w, S, 1);
}

template <int DH>
void tattn_fwd_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, int64_t bias_b,
                   at::Tensor& y) {
  const int64_t B = q.size(0), T = q.size(1), P = q.size(2), D = q.size(3), S = k.size(1);
  const Frames fq(q), fk(k), fv(v);
  const FramesOut fy(y);
  at::parallel_for(0, B * P, 16, [&](int64_t b0, int64_t e0) {
    vf kv[TMAX], vv[TMAX], w[TMAX];
    for (int64_t idx = b0; idx < e0; ++idx) {
      const int64_t b = idx / P, pp = idx % P;
      const float* bb = bias ? bias + (bias_b == 1 ? 0 : b) * T * S : nullptr;
      for (int64_t c = 0; c < D; c += W) {
        for (int64_t s = 0; s < S; ++s) { kv[s] = ld(fk.at(b, s, pp) + c); vv[s] = ld(fv.at(b, s, pp) + c); }
        for (int64_t t = 0; t < T; ++t) {
          frame_weights<DH>(ld(fq.at(b, t, pp) + c), kv, S, bb ? bb + t * S : nullptr, w);
          vf acc = splat(0.f);
          for (int64_t s = 0; s < S; ++s) acc += w[s] * vv[s];
          st(fy.at(b, t, pp) + c, acc);
        }
      }
    }
  });
}

template <int DH>
void tattn_bwd_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, int64_t bias_b,
                   const at::Tensor& g, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), T = q.size(1), P = q.size(2), D = q.size(3), S = k.size(1);
  const Frames fq(q), fk(k), fv(v), fg(g);
  const FramesOut fdq(dq), fdk(dk), fdv(dv);
  at::parallel_for(0, B * P, 16, [&](int64_t b0, int64_t e0) {
    vf kv[TMAX], vv[TMAX], w[TMAX], dp[TMAX], dkv[TMAX], dvv[TMAX];
    for (int64_t idx = b0; idx < e0; ++idx) {
      const int64_t b = idx / P, pp = idx % P;
      const float* bb = bias ? bias + (bias_b == 1 ? 0 : b) * T * S : nullptr;
      for (int64_t c = 0; c < D; c += W) {
        for (int64_t s = 0; s < S; ++s) {
          kv[s] = ld(fk.at(b, s, pp) + c); vv[s] = ld(fv.at(b, s, pp) + c);
          dkv[s] = splat(0.f); dvv[s] = splat(0.f);
        }
        for (int64_t t = 0; t < T; ++t) {
          const vf qt = ld(fq.at(b, t, pp) + c), gt = ld(fg.at(b, t, pp) + c);
          frame_weights<DH>(qt, kv, S, bb ? bb + t * S : nullptr, w);
          vf wdp = splat(0.f);
          for (int64_t s = 0; s < S; ++s) { dp[s] = group_sum<DH>(gt * vv[s]); wdp += w[s] * dp[s]; }
          vf dqt = splat(0.f);
          for (int64_t s = 0; s < S; ++s) {
            const vf ds = w[s] * (dp[s] - wdp);
            dqt += ds * kv[s];
            dkv[s] += ds * qt;
            dvv[s] += w[s] * gt;
          }
          st(fdq.at(b, t, pp) + c, dqt);
        }
        for (int64_t s = 0; s < S; ++s) { st(fdk.at(b, s, pp) + c, dkv[s]); st(fdv.at(b, s, pp) + c, dvv[s]); }
      }
    }
  });
}

#define DISPATCH_DH(d, CALL)                                 \
  switch (d) {                                               \
    case 1: { constexpr int DH = 1; CALL; break; }           \
    case 2: { constexpr int DH = 2; CALL; break; }           \
    case 4: { constexpr int DH = 4; CALL; break; }           \
    case 8: { constexpr int DH = 8; CALL; break; }           \
    case 16: { constexpr int DH = 16; CALL; break; }         \
    default: TORCH_CHECK(false, "temporal attention: head dim ", d, " not compiled"); \
  }

void check_frames(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int64_t dh) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(3) == 1,
                "temporal attention: expected float32 CPU tensors [B, T, P, D] with a contiguous last dim");
  TORCH_CHECK(q.size(3) % W == 0 && k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2)
              && q.size(3) == k.size(3) && q.size(1) <= TMAX && k.size(1) <= TMAX && k.size(1) > 0,
              "temporal attention: shapes");
  if (bias.numel())
    TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.dim() == 3 && bias.size(1) == q.size(1)
                && bias.size(2) == k.size(1) && (bias.size(0) == 1 || bias.size(0) == q.size(0)),
                "temporal attention: bias [1 or B, T, S]");
}

at::Tensor tattn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int64_t dh) {
  check_frames(q, k, v, bias, dh);
  at::Tensor y = at::empty(q.sizes(), q.options());
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  DISPATCH_DH(dh, tattn_fwd_all<DH>(q, k, v, bp, bias.numel() ? bias.size(0) : 1, y));
  return y;
}

void tattn_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
               const at::Tensor& g, at::Tensor dq, at::Tensor dk, at::Tensor dv, int64_t dh) {
  check_frames(q, k, v, bias, dh);
  TORCH_CHECK(g.sizes() == q.sizes() && dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes()
              && g.stride(3) == 1 && dq.stride(3) == 1 && dk.stride(3) == 1 && dv.stride(3) == 1
              && g.scalar_type() == at::kFloat && dq.scalar_type() == at::kFloat, "temporal attention: gradient layout");
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  DISPATCH_DH(dh, tattn_bwd_all<DH>(q, k, v, bp, bias.numel() ? bias.size(0) : 1, g, dq, dk, dv));
}

// ---- inference helpers: RMS norm, q/k norm + rotation, SwiGLU activation -----------------------
inline vf vsqrt_inv(vf x) {  // 1 / sqrt(x), lane-wise (vectorised by -fno-math-errno)
  vf r;
  for (int i = 0; i < W; ++i) r[i] = 1.f / std::sqrt(x[i]);
  return r;
}

struct Rows {  // a tensor [..., C] whose leading dims flatten to rows of a uniform stride
  int64_t n, stride;
};
Rows rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "expected a float32 CPU tensor with a contiguous last dim");
  int64_t n = 1, stride = x.size(-1), expect = -1;
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (expect < 0) stride = x.stride(d);
    else TORCH_CHECK(x.stride(d) == expect, "rows are not evenly spaced");
    expect = x.stride(d) * x.size(d);
    n *= x.size(d);
  }
  return {n, stride};
}

// x / rms(x) over the last dim C (C % 16 == 0) -> contiguous; with y: also returns x + y (the residual).
std::tuple<at::Tensor, at::Tensor> add_rms(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(C % W == 0, "add_rms: channels must be a multiple of 16");
  const Rows rx = rows_of(x);
  Rows ry{0, 0};
  const bool has_y = y.has_value() && y->defined();
  if (has_y) { TORCH_CHECK(y->sizes() == x.sizes(), "add_rms: shapes"); ry = rows_of(*y); }
  at::Tensor sum = at::empty(has_y ? x.sizes() : at::IntArrayRef({0}), x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* yp = has_y ? y->data_ptr<float>() : nullptr;
  float* sp = has_y ? sum.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rx.n, 64, [&](int64_t b, int64_t e) {
    std::vector<vf> buf(C / W);
    for (int64_t r = b; r < e; ++r) {
      vf ss = splat(0.f);
      for (int64_t c = 0; c < C; c += W) {
        vf v = ld(xp + r * rx.stride + c);
        if (yp) { v += ld(yp + r * ry.stride + c); st(sp + r * C + c, v); }
        buf[c / W] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(hsum(ss) / C + (float)eps);
      for (int64_t c = 0; c < C; c += W) st(op + r * C + c, buf[c / W] * inv);
    }
  });
  return {sum, out};
}

// q|k of a projection x [N0, N1, N2, >= 2D] (rows strided), optionally RMS-normed per head (eps >= 0),
// then rotated: out = n(x) * C + swap(n(x)) * S, swap = lane XOR `mask` (rotate-half within a head;
// signs, norm weights and scale live in C/S [T0, T1, T2, 2D], T_i in {1, N_i}) -> [N0, N1, N2, 2D].
template <int DH, int M>
void qk_prep_all(const at::Tensor& x, const at::Tensor& C, const at::Tensor& S, double eps, at::Tensor& out) {
  const int64_t N0 = x.size(0), N1 = x.size(1), N2 = x.size(2), D2 = out.size(3);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const int64_t t0 = C.size(0) == 1 ? 0 : C.stride(0), t1 = C.size(1) == 1 ? 0 : C.stride(1),
                t2 = C.size(2) == 1 ? 0 : C.stride(2);
  const float* xp = x.data_ptr<float>();
  const float* cp = C.data_ptr<float>();
  const float* sp = S.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool norm = eps >= 0;
  const vf veps = splat((float)eps);
  at::parallel_for(0, N0 * N1 * N2, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i2 = r % N2, i1 = (r / N2) % N1, i0 = r / (N1 * N2);
      const float* xr = xp + i0 * s0 + i1 * s1 + i2 * s2;
      const int64_t tr = i0 * t0 + i1 * t1 + i2 * t2;
      float* orow = op + r * D2;
      for (int64_t c = 0; c < D2; c += W) {
        vf v = ld(xr + c);
        if (norm) v *= vsqrt_inv(group_sum<DH>(v * v) * (1.f / DH) + veps);
        vf sw = v;
        if constexpr (M > 0) sw = xsh<M>(v);
        st(orow + c, v * ld(cp + tr + c) + sw * ld(sp + tr + c));
      }
    }
  });
}

at::Tensor qk_prep(const at::Tensor& x, const at::Tensor& C, const at::Tensor& S, int64_t dh, int64_t mask, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "qk_prep: x");
  TORCH_CHECK(C.dim() == 4 && C.sizes() == S.sizes() && C.is_contiguous() && S.is_contiguous() && C.size(3) % W == 0
              && x.size(3) >= C.size(3) && C.scalar_type() == at::kFloat, "qk_prep: tables");
  for (int d = 0; d < 3; ++d) TORCH_CHECK(C.size(d) == 1 || C.size(d) == x.size(d), "qk_prep: table broadcast");
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), C.size(3)}, x.options());
#define QK(DHV, MV) if (dh == DHV && mask == MV) { qk_prep_all<DHV, MV>(x, C, S, eps, out); return out; }
  QK(1, 0) QK(2, 0) QK(2, 1) QK(4, 0) QK(4, 1) QK(4, 2) QK(8, 0) QK(8, 2) QK(8, 4) QK(16, 0) QK(16, 4) QK(16, 8)
#undef QK
  TORCH_CHECK(false, "qk_prep: head dim ", dh, " / swap ", mask, " not compiled");
}

// silu(g) * u for gu = [g | u] [..., 2h] -> [..., h]
at::Tensor swiglu(const at::Tensor& gu) {
  const Rows rr = rows_of(gu);
  const int64_t h = gu.size(-1) / 2;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = h;
  at::Tensor out = at::empty(shape, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rr.n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gp + r * rr.stride;
      const float* u = g + h;
      float* o = op + r * h;
      int64_t c = 0;
      for (; c + W <= h; c += W) {
        const vf gv = ld(g + c);
        const vf ex = vexp(-gv > splat(88.f) ? splat(88.f) : -gv);
        st(o + c, gv / (1.f + ex) * ld(u + c));
      }
      for (; c < h; ++c) o[c] = g[c] / (1.f + std::exp(-g[c])) * u[c];
    }
  });
  return out;
}

// Per row of x [..., V]: the largest entry among columns where excl == 0 (first on ties) -> (value, index).
std::tuple<at::Tensor, at::Tensor> rowmax_excl(const at::Tensor& x, const at::Tensor& excl) {
  const Rows rr = rows_of(x);
  const int64_t V = x.size(-1);
  TORCH_CHECK(excl.numel() == V && excl.scalar_type() == at::kBool && excl.is_contiguous(), "rowmax_excl: mask");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor val = at::empty(shape, x.options());
  at::Tensor idx = at::empty(shape, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const bool* ep = excl.data_ptr<bool>();
  std::vector<float> bias(V);  // 0 or -inf
  for (int64_t c = 0; c < V; ++c) bias[c] = ep[c] ? NEG_INF : 0.f;
  float* vp = val.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, rr.n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = xp + r * rr.stride;
      vf best = splat(NEG_INF);
      vi bidx = vi{} - 1;
      vi lane;
      for (int i = 0; i < W; ++i) lane[i] = i;
      int64_t c = 0;
      for (; c + W <= V; c += W) {
        const vf v = ld(row + c) + ld(bias.data() + c);
        const vi gt = v > best;
        best = gt ? v : best;
        bidx = gt ? lane + (int32_t)c : bidx;
      }
      float bv = NEG_INF;
      int64_t bi = -1;
      for (int i = 0; i < W; ++i)
        if (bidx[i] >= 0 && (best[i] > bv || (best[i] == bv && bidx[i] < bi))) { bv = best[i]; bi = bidx[i]; }
      for (; c < V; ++c) {
        const float v = row[c] + bias[c];
        if (v > bv || (v == bv && bi > c)) { bv = v; bi = c; }
      }
      vp[r] = bv;
      ip[r] = bi;
    }
  });
  return {val, idx};
}

// Threads that took part in one at::parallel_for over 64 items: 1 where the build has no
// OpenMP (the loop then runs serially whatever torch.set_num_threads says).
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t(1) << (at::get_thread_num() & 63)); });
  return __builtin_popcountll(seen.load());
}

void check4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.stride(3) == 1,
              name, ": expected a float32 CPU tensor [N, L, H, d] with a contiguous last dim");
}

inline int64_t off(const at::Tensor& t, int64_t n, int64_t hh) { return n * t.stride(0) + hh * t.stride(2); }

Head head_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n, int64_t hh) {
  return Head{q.data_ptr<float>() + off(q, n, hh), q.stride(1), k.data_ptr<float>() + off(k, n, hh), k.stride(1),
              v.data_ptr<float>() + off(v, n, hh), v.stride(1)};
}

template <int D>
void fwd_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, float* lse, double scale) {
  const int64_t N = q.size(0), L = q.size(1), H = q.size(2), S = k.size(1);
  const int64_t Sp = (S + W - 1) / W * W;
  float* op = o.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf((2 * D + QB) * Sp);
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t n = idx / H, hh = idx % H;
      fwd_head<D>(head_of(q, k, v, n, hh), op + off(o, n, hh), o.stride(1), lse ? lse + (n * H + hh) * L : nullptr,
                  L, S, (float)scale, buf.data());
    }
  });
}

template <int D>
void bwd_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
             const at::Tensor& lse, const at::Tensor& g, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double scale) {
  const int64_t N = q.size(0), L = q.size(1), H = q.size(2), S = k.size(1);
  const int64_t Sp = (S + W - 1) / W * W;
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(5 * D * Sp + 2 * QB * Sp);
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t n = idx / H, hh = idx % H;
      bwd_head<D>(head_of(q, k, v, n, hh), o.data_ptr<float>() + off(o, n, hh), o.stride(1),
                  g.data_ptr<float>() + off(g, n, hh), g.stride(1), lse.data_ptr<float>() + (n * H + hh) * L,
                  dq.data_ptr<float>() + off(dq, n, hh), dq.stride(1), dk.data_ptr<float>() + off(dk, n, hh), dk.stride(1),
                  dv.data_ptr<float>() + off(dv, n, hh), dv.stride(1), L, S, (float)scale, buf.data());
    }
  });
}

#define DISPATCH_D(d, CALL)                                  \
  switch (d) {                                               \
    case 2: { constexpr int DD = 2; CALL; break; }           \
    case 4: { constexpr int DD = 4; CALL; break; }           \
    case 8: { constexpr int DD = 8; CALL; break; }           \
    case 16: { constexpr int DD = 16; CALL; break; }         \
    default: TORCH_CHECK(false, "small attention: head dim ", d, " not compiled"); \
  }

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, bool need_lse) {
  check4(q, "q"); check4(k, "k"); check4(v, "v");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3)
              && k.size(1) > 0, "small attention: q/k/v shapes do not match");
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = need_lse ? at::empty({q.size(0), q.size(2), q.size(1)}, q.options()) : at::empty({0}, q.options());
  float* lp = need_lse ? lse.data_ptr<float>() : nullptr;
  DISPATCH_D(q.size(3), fwd_all<DD>(q, k, v, o, lp, scale));
  return {o, lse};
}

void attn_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
              const at::Tensor& lse, const at::Tensor& g, at::Tensor dq, at::Tensor dk, at::Tensor dv, double scale) {
  check4(q, "q"); check4(k, "k"); check4(v, "v"); check4(o, "o"); check4(g, "grad");
  check4(dq, "dq"); check4(dk, "dk"); check4(dv, "dv");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2), "small attention: lse");
  DISPATCH_D(q.size(3), bwd_all<DD>(q, k, v, o, lse, g, dq, dk, dv, scale));
}

}  // namespace

TORCH_LIBRARY(genie_sima_attn, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, float scale, bool need_lse) -> (Tensor, Tensor)");
  m.def("bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor grad, Tensor(a!) dq, Tensor(b!) dk, "
        "Tensor(c!) dv, float scale) -> ()");
  m.def("tfwd(Tensor q, Tensor k, Tensor v, Tensor bias, int dh) -> Tensor");
  m.def("add_rms(Tensor x, Tensor? y, float eps) -> (Tensor, Tensor)");
  m.def("qk_prep(Tensor x, Tensor c, Tensor s, int dh, int mask, float eps) -> Tensor");
  m.def("swiglu(Tensor gu) -> Tensor");
  m.def("rowmax_excl(Tensor x, Tensor excl) -> (Tensor, Tensor)");
  m.def("parallel_threads() -> int", &parallel_threads);  // no tensor to dispatch on: one kernel for all
  m.def("tbwd(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor grad, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
        "int dh) -> ()");
}

TORCH_LIBRARY_IMPL(genie_sima_attn, CPU, m) {
  m.impl("fwd", &attn_fwd);
  m.impl("bwd", &attn_bwd);
  m.impl("tfwd", &tattn_fwd);
  m.impl("tbwd", &tattn_bwd);
  m.impl("add_rms", &add_rms);
  m.impl("qk_prep", &qk_prep);
  m.impl("swiglu", &swiglu);
  m.impl("rowmax_excl", &rowmax_excl);
}
"""

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _build_flags() -> list[str]:
    """Compiler flags. ``at::parallel_for`` is a header template: with PyTorch's OpenMP backend it
    splits work across threads only where the extension itself is compiled with OpenMP; without
    ``-fopenmp`` every kernel silently ran on one thread (attention 1.8-1.9x slower at 2 threads)."""
    flags = ["-O3", "-march=native", "-fno-math-errno"]
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # the process already holds torch's libgomp, which the kernel then shares
    return flags


def kernel_available() -> bool:
    """Build (once per machine, then cached) and load the kernel; False where it cannot be built,
    and while ``torch.compile`` traces (it sees the plain PyTorch ops instead)."""
    if _compiling():
        return False
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if os.environ.get("GENIE_SIMA_ATTN_KERNEL", "1") != "0":
            try:
                from torch.utils.cpp_extension import load_inline

                flags = _build_flags()
                # The name keys the build cache: a new source, flags, torch or CPU builds afresh (the
                # code is compiled for the CPU it runs on).
                key = hashlib.sha256((_SOURCE + " ".join(flags) + torch.__version__ + _cpu_flags()).encode()).hexdigest()[:16]
                load_inline(f"genie_sima_attn_{key}", cpp_sources=[_SOURCE], extra_cflags=flags,
                            extra_ldflags=[f for f in flags if f == "-fopenmp"],
                            is_python_module=False, no_implicit_headers=True)
                ok = hasattr(torch.ops.genie_sima_attn, "fwd")
            except Exception as e:  # no compiler, no headers, ...: SDPA does the same maths
                warnings.warn(f"small-head attention kernel unavailable, using SDPA ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)
        _state["ok"] = ok
        return ok


def _use_kernel(*ts: torch.Tensor) -> bool:
    q = ts[0]
    return (q.device.type == "cpu" and q.shape[-1] in KERNEL_HEAD_DIMS
            and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in ts) and kernel_available())


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        need = any(ctx.needs_input_grad[:3])
        o, lse = torch.ops.genie_sima_attn.fwd(q, k, v, scale, need)
        if need:
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
        torch.ops.genie_sima_attn.bwd(q, k, v, o, lse, _last_contiguous(grad), dq, dk, dv, ctx.scale)
        return dq, dk, dv, None


class _KernelAttentionPacked(torch.autograd.Function):
    """Attention over one packed projection qkv [N, L, 3, H, d]: its gradient is written in place
    into one [N, L, 3, H, d] buffer (no stacking copy in the backward)."""

    @staticmethod
    def forward(ctx, qkv, scale):
        q, k, v = qkv.unbind(2)
        o, lse = torch.ops.genie_sima_attn.fwd(q, k, v, scale, ctx.needs_input_grad[0])
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(qkv, o, lse)
            ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad):
        qkv, o, lse = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype)
        torch.ops.genie_sima_attn.bwd(*qkv.unbind(2), o, lse, _last_contiguous(grad), *dqkv.unbind(2), ctx.scale)
        return dqkv, None


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per (batch, head): q [N, L, H, d], k/v [N, S, H, d] -> [N, L, H, d]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_kernel(q, k, v):
        return _KernelAttention.apply(q, k, v, float(scale))
    return _sdpa(q, k, v, scale)


def attention_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``attention`` of a packed projection qkv [N, L, 3, H, d] -> [N, L, H, d]."""
    if scale is None:
        scale = qkv.shape[-1] ** -0.5
    if _use_kernel(qkv):
        return _KernelAttentionPacked.apply(qkv, float(scale))
    return _sdpa(*qkv.unbind(2), scale)


def _sdpa(q, k, v, scale):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return y.transpose(1, 2)  # the CPU flash kernel's output is [N, L, H, d] in memory


# --- attention over time: a few frames per (batch, patch) -------------------------------------------
FRAME_KERNEL_MAX = 32  # frames per call the kernel takes (TMAX)


class _KernelFrames(torch.autograd.Function):
    """Self-attention over the frames of a clip from one rotated q|k tensor [B, T, P, 2D]: the
    gradient of q and k lands in one buffer of that layout."""

    @staticmethod
    def forward(ctx, qk, v, bias, dh):
        d = v.shape[-1]
        y = torch.ops.genie_sima_attn.tfwd(qk[..., :d], qk[..., d:], v, bias, dh)
        ctx.save_for_backward(qk, v, bias)
        ctx.dh = dh
        return y

    @staticmethod
    def backward(ctx, grad):
        qk, v, bias = ctx.saved_tensors
        d = v.shape[-1]
        dqk, dv = torch.empty(qk.shape, dtype=qk.dtype), torch.empty(v.shape, dtype=v.dtype)
        torch.ops.genie_sima_attn.tbwd(qk[..., :d], qk[..., d:], v, bias, _last_contiguous(grad), dqk[..., :d],
                                       dqk[..., d:], dv, ctx.dh)
        return dqk, dv, None, None


def _frames_kernel_ok(d: int, dh: int, t: int, s: int, *ts: torch.Tensor) -> bool:
    return (ts[0].device.type == "cpu" and d % 16 == 0 and dh in (1, 2, 4, 8, 16) and t <= FRAME_KERNEL_MAX
            and s <= FRAME_KERNEL_MAX and all(x.dtype == torch.float32 and x.stride(-1) == 1 for x in ts)
            and kernel_available())


def _bias3(bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """[Bb, T, S, 1, 1] or [Bb, T, S] additive mask -> contiguous [Bb, T, S] (empty: none)."""
    if bias is None:
        return torch.empty(0, dtype=dtype)
    while bias.dim() > 3:
        bias = bias.squeeze(-1)
    if bias.dim() == 2:
        bias = bias[None]
    return bias.to(dtype).contiguous()


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    bias: torch.Tensor | None = None, qk: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over time per (batch, patch, head): q [B, T, P, D] (pre-scaled), k/v [B, S, P, D],
    ``bias`` [T, S] or [B, T, S] (0 / -inf, any trailing singleton dims) -> [B, T, P, D].
    ``qk`` (optional): q and k as one [B, T, P, 2D] tensor (training self-attention: one gradient
    buffer)."""
    b, t, p, d = q.shape
    s, dh = k.shape[1], d // heads
    if _frames_kernel_ok(d, dh, t, s, q, k, v):
        b3 = _bias3(bias, q.dtype)
        if not (torch.is_grad_enabled() and any(z.requires_grad for z in (q, k, v))):
            return torch.ops.genie_sima_attn.tfwd(q, k, v, b3, dh)
        if qk is not None:
            return _KernelFrames.apply(qk, v, b3, dh)
    return frame_attention_reference(q, k, v, heads, bias)


def frame_attention_reference(q, k, v, heads: int, bias=None) -> torch.Tensor:
    """``frame_attention`` in PyTorch ops: broadcast products for short windows, SDPA for long ones."""
    b, t, p, d = q.shape
    s, dh = k.shape[1], d // heads
    q5, k5, v5 = (z.reshape(z.shape[0], z.shape[1], p, heads, dh) for z in (q, k, v))
    b3 = None if bias is None else _bias3(bias, q.dtype)  # [Bb, T, S]
    if t > 1 and t * s > 64:  # long causal prefix (priming a long history at once)
        f = lambda z: z.permute(0, 2, 3, 1, 4).reshape(b * p, heads, z.shape[1], dh)  # noqa: E731
        mask = None if b3 is None else (b3 == 0)[:, None]  # [Bb, 1, T, S] -> broadcast over B*P rows
        if mask is not None and mask.shape[0] != 1:
            mask = mask.repeat_interleave(p, 0)
        y = F.scaled_dot_product_attention(f(q5), f(k5), f(v5), attn_mask=mask, scale=1.0)
        return y.view(b, p, heads, t, dh).permute(0, 3, 1, 2, 4).reshape(b, t, p, d)
    scores = (q5.unsqueeze(2) * k5.unsqueeze(1)).sum(-1)  # [B, T, S, P, H]
    if b3 is not None:
        scores = scores + b3[..., None, None]
    w = scores.softmax(2)
    return (w.unsqueeze(-1) * v5.unsqueeze(1)).sum(2).reshape(b, t, p, d)
