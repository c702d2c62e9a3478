"""World-model speed: train-step time of tokenizer, latent actions and dynamics, and one-frame
generation time (MaskGIT with the temporal KV cache), at a configurable size.

    python bench/world_model.py [--threads 2] [--runs 7] [--frame-size 64 --patch 4 --frames 4 --batch 8
                                 --width 32 --heads 8 --tok-blocks 4 --dyn-blocks 8 --maskgit-steps 10]

Defaults are the tinyworlds-sized config of the world-model issue. Each figure is the median of
--runs timed repetitions after one warm-up; one JSON line per figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402


def _time(fn, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--frame-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tok-blocks", type=int, default=4, help="encoder and decoder blocks each")
    ap.add_argument("--dyn-blocks", type=int, default=8)
    ap.add_argument("--maskgit-steps", type=int, default=10)
    ap.add_argument("--latent-actions", type=int, default=8)
    ap.add_argument("--gen-batch", type=int, default=1, help="envs generated at once")
    ap.add_argument("--context-frames", type=int, default=16, help="KV-cache window (as the World uses)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model's loss (inductor)")
    args = ap.parse_args()

    import torch

    from genie_world.dynamics import DynamicsModel
    from genie_world.latent_actions import LatentActionModel
    from genie_world.video_tokenizer import VideoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    fs, p = args.frame_size, args.patch
    tok = VideoTokenizer(fs, p, args.width, args.heads, args.tok_blocks, args.tok_blocks, "8,5,5,5").to(dev)
    lam = LatentActionModel(fs, p, args.width, args.heads, args.tok_blocks, args.tok_blocks, args.latent_actions).to(dev)
    num_p = (fs // p) ** 2
    dyn = DynamicsModel(tok.vocab_size, num_p, args.latent_actions, args.width, args.heads, args.dyn_blocks).to(dev)
    frames = torch.randint(0, 256, (args.batch, args.frames, fs, fs, 3), dtype=torch.uint8, device=dev)
    ids = torch.randint(0, tok.vocab_size, (args.batch, args.frames, num_p), device=dev)
    actions = torch.randint(0, args.latent_actions, (args.batch, args.frames - 1), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def train_step(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if args.compile:
            loss_fn = torch.compile(loss_fn)

        def step():
            loss, _ = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
        return step

    ctx = dict(frame_size=fs, patch=p, frames=args.frames, batch=args.batch, width=args.width, heads=args.heads,
               tok_blocks=args.tok_blocks, dyn_blocks=args.dyn_blocks, maskgit_steps=args.maskgit_steps,
               threads=args.threads, preset="tinyworlds-sized", compiled=args.compile)
    emit("world_model", "tokenizer_train_step_s", _time(train_step(tok, lambda: tok.loss(frames)), args.runs), "s", **ctx)
    emit("world_model", "latent_actions_train_step_s", _time(train_step(lam, lambda: lam.loss(frames)), args.runs), "s", **ctx)
    emit("world_model", "dynamics_train_step_s", _time(train_step(dyn, lambda: dyn.loss(ids, actions, gen)), args.runs), "s", **ctx)

    dyn.eval()
    g = args.gen_batch
    with torch.no_grad():
        def one_frame(history: int):
            cache = dyn.new_cache(args.context_frames)
            ctx_ids = torch.randint(0, tok.vocab_size, (g, history, num_p), device=dev)
            dyn.prime(cache, ctx_ids[:, :1], None)
            if history > 1:
                dyn.prime(cache, ctx_ids[:, 1:], torch.zeros(g, history - 1, dtype=torch.long, device=dev))
            a = torch.zeros(g, dtype=torch.long, device=dev)
            # One uncommitted pass moves the history into the cache's frame buffer, where it sits
            # after any generated frame; the views saved below then rewind within that buffer.
            dyn.transformer.forward_cached(dyn.tok_embed(ctx_ids[:, -1:]) + dyn.pos, cache)
            saved = [(layer.k, layer.v) for layer in cache.layers]

            def gen_frame():
                # Generate one frame, then drop it again so every repetition sees the same history.
                dyn.generate_next(cache, a, args.maskgit_steps, 1.0, "cosine", gen)
                for layer, (k0, v0) in zip(cache.layers, saved):
                    layer.k, layer.v = k0, v0
                cache.next_pos -= 1
                sync()
            return gen_frame

        emit("world_model", "generate_frame_s", _time(one_frame(args.frames - 1), args.runs), "s",
             **ctx, gen_batch=g, history_frames=args.frames - 1)
        emit("world_model", "generate_frame_s_history_64", _time(one_frame(64), args.runs), "s",
             **ctx, gen_batch=g, history_frames=64, context_frames=args.context_frames)


if __name__ == "__main__":
    main()
