"""``genie-sima evaluate``: run a trained policy in the REAL game next to baselines, and write a table.

    genie-sima evaluate --policy RUN_OR_CHECKPOINT --levels BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0
                        --episodes 200 [--baselines random,bot] [--out DIR]

Per level and agent: success rate, mean return, mean path length of successful episodes, and the
bot's path length on the same seeds. Episode i of every agent starts from the same level seed, so the
rows compare like with like. With ``--bundle B --imagined N``, each policy also plays the world model
from the first N episodes' real first frames, and its imagined actions are replayed in the real game:
imagined success beside what the real game gives for the same actions (imagined_vs_real.py). Writes
DIR/evaluation.json and DIR/evaluation.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sima_policy.instruction_tokenizer import UnknownWordsError

from .atomic_io import check_writable_dir, write_bytes_atomic, write_json_atomic
from .config import check_fields, config_field as _f, save_config
from .errors import ConfigError
from .progress import ProgressLine


@dataclass
class EvaluateConfig:
    policy: str | None = _f(None, "policies to play: RUN or name=RUN,name=RUN (train runs, their checkpoints, bc runs); "
                               "omit for baselines only")
    levels: str = _f("BabyAI-GoToRedBall-v0,BabyAI-GoToLocal-v0", "comma-separated real BabyAI levels")
    episodes: int = _f(200, "episodes per level and agent", at_least=1)
    baselines: str = _f("random,bot", "comma-separated baselines to run beside the policy (random, bot, or empty)")
    out: str | None = _f(None, "directory for evaluation.json / evaluation.md (default: the policy's run dir)")
    max_steps: int = _f(64, "episode time limit in the real game")
    seed: int = _f(10_000, "first level seed (episode i uses seed + i)")
    greedy: bool = _f(True, "take the most probable action (else sample)")
    threads: int = _f(1, "torch threads")
    bundle: str | None = _f(None, "world bundle: GIFs of each policy in the real game beside the world model's "
                                  "imagined rollout of the same actions")
    gifs: int = _f(2, "episodes per policy and level to show as real-vs-imagined GIFs (needs --bundle)",
                   at_least=0)
    imagined: int = _f(0, "with --bundle: also play each policy in the world model from the first N episodes' real "
                          "first frames, and replay its imagined actions in the real game (imagined success vs "
                          "the real game's for the same actions; pipelines/imagined_vs_real.py)", at_least=0)


def resolve_policy(policy: str) -> tuple[Path, Path]:
    """A policy path -> (RLModule checkpoint dir, its tokenizer.json).

    Accepts a ``genie-sima train --out`` directory (its newest checkpoint), one of its
    ``checkpoints/iter_*``, or a ``genie-sima bc --out`` directory.
    """
    from .bc_latent import POLICY_DIR
    from .train_policy import latest_checkpoint

    p = Path(policy).resolve()  # RLlib reads checkpoints by URI: relative paths have no scheme
    if not p.exists():
        raise ConfigError(f"--policy {policy}: no such directory")
    if (p / POLICY_DIR).is_dir():
        return p / POLICY_DIR, p / "tokenizer.json"
    if (p / "checkpoints").is_dir():
        newest = latest_checkpoint(p)
        if newest is None:
            raise ConfigError(f"--policy {p}: no checkpoints in {p / 'checkpoints'}")
        p = newest
    module = p / "learner_group" / "learner" / "rl_module" / "default_policy"
    if not module.is_dir():
        raise ConfigError(f"--policy {policy}: not a genie-sima train run, RLlib checkpoint or bc run "
                          f"({module} and {p / POLICY_DIR} missing)")
    return module, p.parent.parent / "tokenizer.json"


def parse_policies(spec: str | None) -> dict[str, str]:
    """``RUN`` or ``name=RUN,name=RUN`` -> {name: RUN}; a bare path is called "policy"."""
    out: dict[str, str] = {}
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        name, _, path = item.rpartition("=") if "=" in item else ("policy", "", item)
        name = name.strip()
        if not name or name in ("random", "bot") or name in out:
            raise ConfigError(f"--policy {spec!r}: bad or repeated name {name!r} (expected name=RUN, names "
                              "other than random/bot, each once)")
        out[name] = path.strip()
    return out


class PolicyAgent:
    """The trained RLModule acting on {"image", "mission" tokens} observations."""

    def __init__(self, policy: str, greedy: bool, name: str = "policy"):
        from ray.rllib.core.rl_module.rl_module import RLModule

        from sima_policy.instruction_tokenizer import InstructionTokenizer

        module_dir, tokenizer_json = resolve_policy(policy)
        module = RLModule.from_checkpoint(str(module_dir))
        self._setup(module, InstructionTokenizer.from_json(json.loads(tokenizer_json.read_text())), greedy, name, 0)
        self.path = str(module_dir)

    @classmethod
    def of_module(cls, module, tokenizer, greedy: bool, name: str = "policy", seed: int = 0) -> "PolicyAgent":
        """An agent around a live module (e.g. a training run's current policy)."""
        agent = cls.__new__(cls)
        agent._setup(module, tokenizer, greedy, name, seed)
        agent.path = ""
        return agent

    def _setup(self, module, tokenizer, greedy: bool, name: str, seed: int) -> None:
        import torch

        self.name, self.module, self.tokenizer = name, module, tokenizer
        self.module.eval()
        self.max_len = int(self.module.observation_space["mission"].shape[0])
        self.greedy, self.torch = greedy, torch
        self.rng = torch.Generator().manual_seed(seed)

    def act(self, frames: np.ndarray, missions: list[str]) -> np.ndarray:
        torch = self.torch
        obs = {"image": torch.from_numpy(frames),
               "mission": torch.from_numpy(self.tokenizer.encode_batch(missions, self.max_len))}
        with torch.no_grad():
            logits = self.module.forward_inference({"obs": obs})["action_dist_inputs"]
        if self.greedy:
            return logits.argmax(-1).numpy()
        return torch.multinomial(logits.softmax(-1), 1, generator=self.rng)[:, 0].numpy()


def run_episodes(level: str, agent, episodes: int, seed: int, max_steps: int, frame_size: int = 64,
                 progress=None, record: int = 0) -> dict:
    """``agent``: "random", "bot" or a PolicyAgent. Returns success rate, mean return and path length;
    with ``record`` > 0 also the first ``record`` episodes' frames, actions and missions ("recorded")."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from .data.babyai_game import BabyAIGame

    rng = np.random.default_rng(seed)
    success, returns, lengths, recorded = [], [], [], []
    is_policy = isinstance(agent, PolicyAgent)
    batch = 16 if is_policy else 1
    pool = [BabyAIGame(level, frame_size=frame_size, max_steps=max_steps) for _ in range(min(batch, episodes))]
    for lo in range(0, episodes, batch):
        games = pool[:min(batch, episodes - lo)]  # made once, reset per episode
        frames = [g.reset(seed + lo + j) for j, g in enumerate(games)]
        tapes = [{"frames": [f], "actions": [], "mission": g.mission, "seed": seed + lo + j}
                 for j, (f, g) in enumerate(zip(frames, games)) if lo + j < record]
        bots = [BabyAIBot(g.unwrapped) for g in games] if agent == "bot" else None
        done = np.zeros(len(games), bool)
        ret, steps = np.zeros(len(games)), np.zeros(len(games), int)
        won = np.zeros(len(games), bool)
        while not done.all():
            if is_policy:
                acts = agent.act(np.stack(frames), [g.mission for g in games])
            elif agent == "bot":
                acts = [int(b.replan()) if not d else 0 for b, d in zip(bots, done)]
            else:
                acts = rng.integers(0, games[0].num_actions, len(games))
            for j, g in enumerate(games):
                if done[j]:
                    continue
                frames[j], r, term, trunc = g.step(int(acts[j]))
                if j < len(tapes):
                    tapes[j]["frames"].append(frames[j])
                    tapes[j]["actions"].append(int(acts[j]))
                ret[j] += r
                steps[j] += 1
                if term or trunc:
                    done[j] = True
                    won[j] = BabyAIGame.is_success(ret[j], term)
        for j, tape in enumerate(tapes):
            tape["success"] = bool(won[j])
        recorded += tapes
        success += won.tolist()
        returns += ret.tolist()
        lengths += steps.tolist()
        if progress is not None:
            progress(len(success))
    for g in pool:
        g.close()
    success_a, lengths_a = np.array(success), np.array(lengths)
    out = {"episodes": episodes, "success_rate": float(success_a.mean()), "mean_return": float(np.mean(returns)),
           "mean_length_success": float(lengths_a[success_a].mean()) if success_a.any() else None}
    return {**out, "recorded": recorded} if record else out


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    import torch

    check_fields(cfg)  # bounds and finite numbers, from Python as from the CLI
    if cfg.imagined > cfg.episodes:
        raise ConfigError(f"--imagined must be in [0, --episodes={cfg.episodes}], got {cfg.imagined}")
    if cfg.imagined and not cfg.bundle:
        raise ConfigError("--imagined needs --bundle (the world model to imagine in)")
    levels = [lv.strip() for lv in cfg.levels.split(",") if lv.strip()]
    if not levels:
        raise ConfigError("--levels: give at least one BabyAI level")
    baselines = [b.strip() for b in cfg.baselines.split(",") if b.strip()]
    bad = [b for b in baselines if b not in ("random", "bot")]
    if bad:
        raise ConfigError(f"--baselines: unknown {bad}; expected random, bot")
    named = parse_policies(cfg.policy)
    if not named and not baselines:
        raise ConfigError("nothing to evaluate: give --policy and/or --baselines")
    torch.set_num_threads(cfg.threads)
    policies = {name: PolicyAgent(path, cfg.greedy, name) for name, path in named.items()}
    if cfg.out:
        out = Path(cfg.out)
    elif len(named) == 1:
        first = Path(next(iter(named.values()))).resolve()
        out = first if (first / "config.json").exists() else first.parent.parent  # a run, or run/checkpoints/iter_*
    elif not named:
        out = Path(".")
    else:
        raise ConfigError("--out is required when evaluating several policies")
    check_writable_dir(out, "--out")
    bundle = None
    if cfg.bundle and (cfg.gifs or cfg.imagined) and policies:
        from genie_world.bundle import load_bundle

        bundle = load_bundle(cfg.bundle)
    agents = list(policies) + baselines
    rows, gifs = [], []
    total = len(levels) * len(agents) * cfg.episodes
    line = ProgressLine("evaluate", total, "episodes", every_s=5.0)
    for level in levels:
        for name in agents:
            base = len(rows) * cfg.episodes
            record = cfg.gifs if bundle is not None and name in policies else 0
            try:
                r = run_episodes(level, policies.get(name, name), cfg.episodes, cfg.seed, cfg.max_steps,
                                 progress=lambda n, base=base: line.update(base + n), record=record)
            except UnknownWordsError as e:
                # A policy trained on another level's missions cannot read this one: a row that says so,
                # and the other rows are kept.
                rows.append({"level": level, "agent": name, "episodes": 0, "success_rate": None,
                             "mean_return": None, "mean_length_success": None, "skipped": str(e)})
                log(f"evaluate: {level} {name}: skipped, the policy cannot read this level's missions ({e})")
                continue
            tapes = r.pop("recorded", [])
            if tapes:
                from .rollout_videos import real_vs_imagined_gifs

                gifs += real_vs_imagined_gifs(bundle, tapes, out / "gifs", f"{name}_{level}")
            if cfg.imagined and name in policies:
                from genie_world.text_encoder import UnknownWordsError as WorldUnknownWords

                from .imagined_vs_real import imagined_vs_real

                # Its own sampling stream: the real-game rows come out the same with or without --imagined.
                agent = policies[name]
                dreamer = PolicyAgent.of_module(agent.module, agent.tokenizer, cfg.greedy, name, seed=cfg.seed)
                try:
                    r.update(imagined_vs_real(bundle, level, dreamer, cfg.imagined, cfg.seed, cfg.max_steps))
                    log(f"evaluate: {level} {name}: imagined success {r['imagined_success']:.3f}, the same actions "
                        f"in the real game {r['replayed_success']:.3f} ({r['imagined_only_wins']} imagined-only wins)")
                except WorldUnknownWords as e:  # the world model cannot read this level's missions
                    r["imagined_skipped"] = str(e)
                    log(f"evaluate: {level} {name}: not imagined, the world model cannot read its missions ({e})")
            rows.append({"level": level, "agent": name, **r})
            log(f"evaluate: {level} {name}: success {r['success_rate']:.3f} return {r['mean_return']:.3f}")
    result = {"policies": {n: p.path for n, p in policies.items()}, "greedy": bool(cfg.greedy), "rows": rows,
              "gifs": [str(g.relative_to(out)) for g in gifs]}
    write_json_atomic(out / "evaluation.json", result)
    save_config(cfg, out / "evaluation.config.json")
    actions = "greedy (most probable action)" if cfg.greedy else "sampled from the policy"
    write_bytes_atomic(out / "evaluation.md", (f"Policies' actions: {actions}.\n\n" + format_table(rows)).encode())
    return result


IMAGINED_COLUMNS = ("imagined success (first N starts)", "the same actions, real game", "imagined-only wins")


def imagined_cells(r: dict) -> list[str]:
    """The imagined-vs-real columns of a row ("" for rows without them: baselines, or no --imagined)."""
    if "imagined_skipped" in r:
        return ["the world model cannot read this level's missions", "", ""]
    if "imagined_success" not in r:
        return ["", "", ""]
    return [f"{r['imagined_success']:.3f} (N={r['imagined_episodes']})", f"{r['replayed_success']:.3f}",
            str(r["imagined_only_wins"])]


def format_table(rows: list[dict]) -> str:
    imagined = any("imagined_success" in r or "imagined_skipped" in r for r in rows)
    head = ["level", "agent", "episodes", "success", "mean return", "mean length (successes)"]
    head += list(IMAGINED_COLUMNS) if imagined else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            cells = [r["level"], r["agent"], "0", "cannot read this level's missions", "", ""]
        else:
            length = "" if r["mean_length_success"] is None else f"{r['mean_length_success']:.1f}"
            cells = [r["level"], r["agent"], str(r["episodes"]), f"{r['success_rate']:.3f}", f"{r['mean_return']:.3f}",
                     length]
        lines.append("| " + " | ".join(cells + (imagined_cells(r) if imagined else [])) + " |")
    return "\n".join(lines) + "\n"
