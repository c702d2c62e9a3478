"""The fidelity report as markdown tables, each figure with its target marked met or missed."""

from __future__ import annotations

from genie_world.fidelity import HORIZONS

from .world_targets import STEP_PREFIX, target_text, verdict


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def fidelity_table(m: dict) -> str:
    """Horizon table (keys / latents / tokenizer ceiling), termination, and one step per real key."""
    hs = [h for h in HORIZONS if f"fidelity_keys_cells_right_h{h}" in m or f"fidelity_latents_cells_right_h{h}" in m]
    cell = m.get("fidelity_cell")
    lines = [f"Fidelity on {m.get('fidelity_episodes')} held-out real episodes (mean length "
             f"{m.get('fidelity_mean_length', 0):.1f} steps), each replayed from its real first frame; a frame is "
             f"right when every {cell}x{cell} cell is within {255 * m.get('fidelity_tol', 0):.0f}/255 of the real one.",
             ""]
    head = ["driven by", "measure"] + [f"h={h}" for h in hs] + ["whole episode"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, label in (("keys", "real keys via adapter"), ("latents", "LAM latents (upper bound)")):
        if f"fidelity_{mode}_episodes_right" not in m:
            continue
        for meas, name in (("cells_right", "frames right"), ("token_exact", "token-exact"),
                           ("token_acc", "token accuracy")):
            row = [label, name] + [_pct(m.get(f"fidelity_{mode}_{meas}_h{h}")) for h in hs]
            row.append(_pct(m.get(f"fidelity_{mode}_episodes_right")) if meas == "cells_right" else "")
            lines.append("| " + " | ".join(row) + " |")
        psnr = [m.get(f"fidelity_{mode}_psnr_h{h}_db") for h in hs]
        lines.append("| " + " | ".join([label, "PSNR dB"] + ["-" if v is None else f"{v:.1f}" for v in psnr] + [""]) + " |")
    ceiling = _pct(m.get("fidelity_ceiling_cells_right"))
    lines.append("| tokenizer ceiling | frames right | " + " | ".join(ceiling for _ in hs)
                 + f" | {_pct(m.get('fidelity_ceiling_episodes_right'))} |")
    lines += ["", "| figure | value | target | |", "|---|---|---|---|"]
    for k in ("fidelity_keys_cells_right_h1", "fidelity_keys_cells_right_h8", "fidelity_keys_episodes_right",
              "fidelity_keys_termination_recall", "fidelity_keys_false_termination",
              "fidelity_latents_termination_recall", "fidelity_latents_false_termination",
              "fidelity_real_frames_termination_recall", "fidelity_real_frames_false_termination"):
        if k in m:
            lines.append(f"| {k.removeprefix('fidelity_')} | {_pct(m[k])} | {target_text(k)} | {verdict(k, m)} |")
    steps = [k for k in m if k.startswith(STEP_PREFIX) and not k.endswith(("_n", "_changing"))]
    if steps:
        lines += ["", "One step from real states (the real history teacher-forced), per real key:", "",
                  "| key | transitions | right | right where the key changed the frame | target | |",
                  "|---|---|---|---|---|---|"]
        for k in steps:
            lines.append(f"| {k.removeprefix(STEP_PREFIX)} | {m.get(k + '_n')} | {_pct(m[k])} | "
                         f"{_pct(m.get(k + '_changing'))} | {target_text(k)} | {verdict(k, m)} |")
    return "\n".join(lines)
