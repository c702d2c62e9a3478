"""The world model's targets, in one place: every table (pretraining, bench, demo report) marks a
figure met or missed against these. A target is (op, bound) with bound a number or another metric's
name (``next_frame_psnr_db`` must beat ``copy_last_psnr_db``)."""

from __future__ import annotations

PROMPT_PREFIX = "prompt_faithful/"  # + the prompt: share of its levels showing the object and one agent
NAMED_PREFIX = "prompt_named_objects/"  # + the prompt: tiles per level showing the object it names
STEP_PREFIX = "fidelity_step_"  # + a real key: one step from real states lands on the right frame

TARGETS: dict[str, tuple[str, float | str]] = {
    "tokenizer_psnr_db": (">=", 35.0),
    "next_frame_psnr_db": (">", "copy_last_psnr_db"),
    "dt_psnr_t4_db": (">", 1.0),
    "action_mapping_accuracy": (">=", 0.90),
    "fidelity_keys_cells_right_h1": (">=", 0.95),
    "fidelity_keys_cells_right_h8": (">=", 0.90),
    "fidelity_keys_episodes_right": (">=", 0.80),
    "fidelity_keys_termination_recall": (">=", 0.90),
    "fidelity_keys_false_termination": ("<=", 0.05),
}
PER_KEY_TARGET = (">=", 0.95)
PROMPT_TARGET = (">=", 0.95)


def target_for(key: str) -> tuple[str, float | str] | None:
    if key in TARGETS:
        return TARGETS[key]
    if key.startswith(STEP_PREFIX) and not key.endswith(("_n", "_changing")):
        return PER_KEY_TARGET
    if key.startswith(PROMPT_PREFIX):
        return PROMPT_TARGET
    return None


def target_text(key: str) -> str:
    t = target_for(key)
    if t is None:
        return ""
    op, bound = t
    if isinstance(bound, str):
        return f"{op} {bound}"
    return f"{op} {100 * bound:.0f}%" if bound <= 1 and key not in ("dt_psnr_t4_db",) else f"{op} {bound:g}"


def verdict(key: str, metrics: dict) -> str:
    """'met', 'MISSED', or '' (no target, or the figure is absent)."""
    t, value = target_for(key), metrics.get(key)
    if t is None or not isinstance(value, (int, float)):
        return ""
    op, bound = t
    if isinstance(bound, str):
        bound = metrics.get(bound)
        if not isinstance(bound, (int, float)):
            return ""
    ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]
    return "met" if ok else "MISSED"
