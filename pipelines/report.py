"""``report.html``: one self-contained page (images inlined) for a demo run directory.

Reads what the demo's steps wrote, section by section, and says plainly when a step's output is missing:

    DIR/timings.json                      wall clock of each step (the demo writes it)
    DIR/world/metrics.json                world-model quality table (``genie-sima pretrain``)
    DIR/levels/grid.png, rollout.gif      prompt-generated levels (``genie-sima generate``)
    DIR/bc/bc_metrics.json                behaviour cloning from latent actions (``genie-sima bc``)
    DIR/ppo/logs/train_events.jsonl       PPO in imagination, per iteration (``genie-sima train``)
    DIR/eval/evaluation.json, gifs/*.gif  the real game (``genie-sima evaluate``)
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from genie_world.atomic_files import write_bytes_atomic

# The world-model metrics a reader needs first (targets: pipelines/world_targets.py).
WORLD_ROWS = [
    ("tokenizer_psnr_db", "tokenizer PSNR (dB)"),
    ("next_frame_psnr_db", "next-frame PSNR (dB)"),
    ("copy_last_psnr_db", "copy-last-frame baseline PSNR (dB)"),
    ("dt_psnr_t4_db", "dtPSNR at t=4 (dB)"),
    ("action_mapping_accuracy", "latent -> real action mapping accuracy"),
    ("adapter_labelled_transitions", "labelled transitions used by the adapter's latent -> key model"),
    ("key_to_latent_labels", "labelled transitions used by the adapter's key -> latent model"),
    ("key_to_latent_val_accuracy", "key -> latent model accuracy (held-out transitions)"),
    ("termination_balanced_accuracy", "termination head balanced accuracy"),
    ("reward_mae", "reward head MAE"),
    ("prior_distinct_levels_of_8", "distinct levels of 8 from one prompt"),
    ("wall_clock_s", "pretraining wall clock (s)"),
]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _img(path: Path, alt: str, width: int | None = None) -> str:
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}"{w}>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def svg_curve(xs: list[float], series: dict[str, list[float]], width: int = 520, height: int = 200) -> str:
    """A line chart as inline SVG (no plotting library): one polyline per series, shared axes."""
    pts = [(x, y) for ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return "<p>(fewer than two points to plot)</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    m = 36
    sx = lambda x: m + (x - x0) / (x1 - x0) * (width - 2 * m)  # noqa: E731
    sy = lambda y: height - m + (y0 - y) / (y1 - y0) * (height - 2 * m)  # noqa: E731
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curve">',
             f'<line x1="{m}" y1="{height - m}" x2="{width - m}" y2="{height - m}" stroke="#888"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{height - m}" stroke="#888"/>',
             f'<text x="{m}" y="{height - 8}" font-size="11">{x0:g}</text>',
             f'<text x="{width - m}" y="{height - 8}" font-size="11" text-anchor="end">{x1:g} env steps</text>',
             f'<text x="4" y="{m}" font-size="11">{y1:.2f}</text>',
             f'<text x="4" y="{height - m}" font-size="11">{y0:.2f}</text>']
    for i, (name, ys) in enumerate(series.items()):
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y is not None and math.isfinite(y))
        colour = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        parts.append(f'<text x="{width - m}" y="{m + 14 * i}" font-size="11" fill="{colour}" '
                     f'text-anchor="end">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _missing(what: str) -> str:
    return f'<p class="missing">Not run: {html.escape(what)} is missing.</p>'


def markdown_to_html(text: str) -> str:
    """The markdown this project's reports print (paragraphs and pipe tables) as HTML."""
    out, rows = [], []

    def flush():
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not set(r) <= set("|-: ")]
            out.append(_table(cells[0], cells[1:]))
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(out)


def _section_world(d: Path) -> str:
    from .fidelity_report import fidelity_table
    from .world_targets import target_text, verdict

    m = _read_json(d / "world" / "metrics.json")
    if m is None:
        return _missing("world/metrics.json")
    rows = [[label, m.get(key), target_text(key), verdict(key, m)] for key, label in WORLD_ROWS if key in m]
    parts = [_table(["metric", "value", "target", "met?"], rows)]
    if any(k.startswith("fidelity_") for k in m):
        parts.append("<h3>Does an imagined episode stay the real one?</h3>" + markdown_to_html(fidelity_table(m)))
    return "".join(parts)


def _section_levels(d: Path) -> str:
    levels = d / "levels"
    parts = []
    cfg = _read_json(levels / "levels.h5.config.json") or {}
    prompt = (cfg.get("config") or {}).get("prompt")
    if prompt:
        parts.append(f"<p>Prompt: <q>{html.escape(prompt)}</q></p>")
    if (levels / "grid.png").exists():
        parts.append("<figure>" + _img(levels / "grid.png", "generated levels") +
                     "<figcaption>First frames of the generated levels</figcaption></figure>")
    parts.append(_prompt_faithfulness(d, prompt))
    if (levels / "rollout.gif").exists():
        parts.append("<figure>" + _img(levels / "rollout.gif", "imagined rollouts", 384) +
                     "<figcaption>Imagined rollouts of those levels</figcaption></figure>")
    return "".join(parts) or _missing("levels/grid.png")


def _prompt_faithfulness(d: Path, prompt: str | None) -> str:
    from .world_targets import NAMED_PREFIX, PROMPT_PREFIX, target_text, verdict

    def named(v) -> str:
        return "-" if v is None else f"{v:.1f}"

    m = _read_json(d / "world" / "metrics.json") or {}
    per_prompt = ((_read_json(d / "world" / "config.json") or {}).get("config") or {}).get("eval_prompt_levels")
    rows = [[k.removeprefix(PROMPT_PREFIX), per_prompt, f"{100 * m[k]:.1f}%",
             named(m.get(NAMED_PREFIX + k.removeprefix(PROMPT_PREFIX))), target_text(k), verdict(k, m)]
            for k in m if k.startswith(PROMPT_PREFIX)]
    own = _read_json(d / "levels" / "generate.json") or {}
    if prompt and "prompt_faithful" in own:  # the training levels themselves
        key = PROMPT_PREFIX + prompt
        rows.insert(0, [f"{prompt} (these levels)", own.get("num_worlds"), f"{100 * own['prompt_faithful']:.1f}%",
                        named(own.get("prompt_named_objects_per_level")), target_text(key),
                        verdict(key, {key: own["prompt_faithful"]})])
    if not rows:
        return ""
    return ("<p>Levels that show the object their prompt names and exactly one agent (each tile read back against "
            "the real game's own renderings), and how many tiles show the named object (a real room: about one; "
            "more makes imagined levels easier than real ones):</p>"
            + _table(["prompt", "levels", "right", "named objects per level", "target", "met?"], rows))


def _section_bc(d: Path) -> str:
    m = _read_json(d / "bc" / "bc_metrics.json")
    if m is None:
        return _missing("bc/bc_metrics.json")
    return _table(["metric", "value"], [[k, v] for k, v in m.items()])


def _section_ppo(d: Path) -> str:
    path = d / "ppo" / "logs" / "train_events.jsonl"
    if not path.exists():
        return _missing("ppo/logs/train_events.jsonl")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    xs = [e.get("steps", i) for i, e in enumerate(events)]
    outcome = {"imagined success": [e.get("imagined_success") for e in events],
               "imagined return": [e.get("env_runners/episode_return_mean") for e in events]}
    if any("real_success" in e for e in events):
        outcome["real-game success"] = [e.get("real_success") for e in events]
    learning = {"policy entropy": [e.get("learners/default_policy/entropy") for e in events],
                "value loss": [e.get("learners/default_policy/vf_loss") for e in events]}
    real = [(e.get("steps"), e["real_success"], e.get("imagined_success")) for e in events if "real_success" in e]
    table = _table(["env steps", "real-game success", "imagined success"], [list(r) for r in real]) if real else ""
    return (_ppo_levels(d) + "<p>Imagined episodes that ended (success = ended by predicted termination), and the same policy in "
            "the real game where it was evaluated:</p>" + svg_curve(xs, outcome) + table
            + "<p>The learner, per iteration:</p>" + svg_curve(xs, learning)
            + f"<p>{len(events)} PPO iterations in imagination, {xs[-1] if xs else 0} env steps.</p>")


def _ppo_levels(d: Path) -> str:
    """Which imagined worlds PPO trained on (the demo's real starts, or the prompt's levels)."""
    env = ((_read_json(d / "ppo" / "config.json") or {}).get("config") or {}).get("env", "")
    starts = _read_json(d / "levels" / "starts.json")
    if "starts.h5" in env and starts:
        demo = (_read_json(d / "demo.config.json") or {}).get("config") or {}
        return (f"<p>Trained on {starts['num_worlds']} levels made from the videos' real first frames "
                f"({starts['distinct_levels']} distinct): {100 * demo.get('starts_share', 1.0):.0f}% of them frames "
                f"that show what <q>{html.escape(str(demo.get('prompt', '')))}</q> names, with it as their mission; "
                "the rest with their own episodes' missions.</p>")
    return "<p>Trained on the levels generated from the prompt.</p>" if "levels.h5" in env else ""


def _section_eval(d: Path) -> str:
    ev = _read_json(d / "eval" / "evaluation.json")
    if ev is None:
        return _missing("eval/evaluation.json")
    from .evaluate import IMAGINED_COLUMNS, imagined_cells

    imagined = any("imagined_success" in r or "imagined_skipped" in r for r in ev["rows"])
    rows = [[r["level"], r["agent"], r["episodes"],
             "cannot read this level's missions" if r.get("skipped") else r["success_rate"], r["mean_return"],
             r["mean_length_success"]] + (imagined_cells(r) if imagined else []) for r in ev["rows"]]
    parts = [_table(["level (real game)", "agent", "episodes", "success", "mean return", "mean length (successes)"]
                    + (list(IMAGINED_COLUMNS) if imagined else []), rows)]
    if imagined:
        gaps = [[r["level"], r["agent"], f"{100 * (r['imagined_success'] - r['replayed_success']):+.1f} points",
                 "<= 10 points", "met" if abs(r["imagined_success"] - r["replayed_success"]) <= 0.10 else "missed"]
                for r in ev["rows"] if "imagined_success" in r]
        parts.append("<p>Imagination against the real game: each policy played the world model from the real first "
                     "frames of the first N episodes, and its imagined actions were replayed in the real game from "
                     "the same seeds. Imagined-only wins are endings the world model paid for that the real game "
                     "did not give.</p>" + _table(["level", "agent", "imagined minus real, same actions", "target",
                                                   "met?"], gaps))
    if "greedy" in ev:
        parts.append("<p>Learned policies' actions: " + ("greedy (the most probable action)." if ev["greedy"] else
                     "sampled from the policy, as in training (greedy cloned policies get stuck in loops).")
                     + "</p>")
    gifs = [d / "eval" / g for g in ev.get("gifs", [])]
    if gifs:
        parts.append("<p>Each GIF: the agent in the real game (left) and the world model's imagined rollout of the "
                     "same actions from the same first frame (right).</p><div class='gifs'>")
        parts += [f"<figure>{_img(g, g.stem, 256)}<figcaption>{html.escape(g.stem)}</figcaption></figure>"
                  for g in gifs if g.exists()]
        parts.append("</div>")
    return "".join(parts)


STEP_ORDER = ["collect", "pretrain", "generate", "bc", "ppo_in_imagination", "real_game_ppo", "evaluate", "total"]


def _section_timings(d: Path) -> str:
    t = _read_json(d / "timings.json")
    if not t:
        return _missing("timings.json")
    names = [k for k in STEP_ORDER if k in t] + sorted(k for k in t if k not in STEP_ORDER)
    return _table(["step", "wall clock (s)"], [[k, f"{float(t[k]):.1f}"] for k in names])


def write_report(run_dir, title: str = "genie-sima demo") -> Path:
    d = Path(run_dir)
    sections = [("Timings", _section_timings(d)), ("World model (held-out data)", _section_world(d)),
                ("Levels from a prompt", _section_levels(d)),
                ("Behaviour cloning from latent actions", _section_bc(d)),
                ("PPO in imagination", _section_ppo(d)), ("The real game", _section_eval(d))]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
             "text-align:left}img{image-rendering:pixelated}.gifs{display:flex;flex-wrap:wrap;gap:1em}"
             ".missing{color:#a00}figure{display:inline-block;margin:.5em}")
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{s}</section>" for h, s in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    out = d / "report.html"
    write_bytes_atomic(out, page.encode())
    return out
