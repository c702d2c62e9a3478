"""The ``genie-sima`` command line. Subcommands grow with the pipeline (collect, info, ...)."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .config import add_config_arguments, config_from_args
from .errors import GenieSimaError


def _cmd_collect(args) -> int:
    from .collect import CollectConfig, collect

    cfg = config_from_args(CollectConfig, args)
    result = collect(cfg)
    print(json.dumps(result))
    return 0


def _cmd_pretrain(args) -> int:
    import dataclasses

    from genie_world.config import WorldModelConfig

    from .pretrain import PretrainArgs, pretrain

    run_args = config_from_args(PretrainArgs, args)
    cfg_fields = {f.name for f in dataclasses.fields(WorldModelConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in cfg_fields}
    result = pretrain(run_args, overrides)
    print(json.dumps({"run": result["run"], "metrics": result["metrics"]}))
    return 0


def _cmd_generate(args) -> int:
    from .generate import GenerateConfig, generate

    print(json.dumps(generate(config_from_args(GenerateConfig, args))))
    return 0


def _cmd_train(args) -> int:
    from .train_policy import TrainConfig, train

    result = train(config_from_args(TrainConfig, args))
    print(json.dumps(result))
    return 0


def _cmd_bc(args) -> int:
    from .bc_latent import BCConfig, behaviour_clone

    result = behaviour_clone(config_from_args(BCConfig, args))
    print(json.dumps(result))
    return 0


def _cmd_demo(args) -> int:
    import dataclasses

    from .demo import DemoConfig, apply_setting, run_demo

    flags = {a.split("=", 1)[0] for a in args.argv if a.startswith("--")}
    given = {f.name for f in dataclasses.fields(DemoConfig) if "--" + f.name.replace("_", "-") in flags}
    result = run_demo(apply_setting(config_from_args(DemoConfig, args), given))
    print(json.dumps(result))
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import EvaluateConfig, evaluate, format_table

    result = evaluate(config_from_args(EvaluateConfig, args), log=lambda m: print(m, file=sys.stderr))
    print(format_table(result["rows"]))
    return 0


def _cmd_play(args) -> int:
    from .play import run_play

    return run_play(args) or 0


def _print_table(d: dict) -> None:
    width = max(len(k) for k in d)
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def _cmd_info(args) -> int:
    from .info import data_info, environment_info

    out = {"genie_sima": __version__, **environment_info()}
    if args.data:
        out["data"] = data_info(args.data, verify=args.verify)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"genie-sima {__version__}")
    _print_table({k: v for k, v in out["versions"].items()})
    print(f"torch CUDA available: {out['torch_cuda_available']} {out.get('torch_cuda_devices') or ''}")
    if args.data:
        print()
        _print_table(out["data"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .collect import CollectConfig

    parser = argparse.ArgumentParser(prog="genie-sima", description=__doc__)
    parser.add_argument("--version", action="version", version=f"genie-sima {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="collect real game video into HDF5 shards + a Parquet manifest")
    add_config_arguments(p, CollectConfig, required=("source", "out"))
    p.set_defaults(func=_cmd_collect)

    from genie_world.config import WorldModelConfig

    from .pretrain import PretrainArgs

    p = sub.add_parser("pretrain", help="train the world model (tokenizer, latent actions, dynamics, heads, prior)")
    add_config_arguments(p, PretrainArgs, required=("data", "out"))
    group = p.add_argument_group("world-model config (override any field of the preset)")
    add_config_arguments(group, WorldModelConfig)
    p.set_defaults(func=_cmd_pretrain)

    from .generate import GenerateConfig

    p = sub.add_parser("generate", help="prompt -> levels (level file), a PNG grid and a GIF of imagined rollouts")
    add_config_arguments(p, GenerateConfig, required=("bundle", "out"))
    p.set_defaults(func=_cmd_generate)

    from .bc_latent import BCConfig

    p = sub.add_parser("bc", help="behaviour cloning from latent actions: videos labelled by the world model -> policy")
    add_config_arguments(p, BCConfig, required=("bundle", "data", "out"))
    p.set_defaults(func=_cmd_bc)

    from .train_policy import TrainConfig

    p = sub.add_parser("train", help="train the SIMA agent with RLlib PPO in a world model (or the real game)")
    add_config_arguments(p, TrainConfig, required=("env", "out"))
    p.set_defaults(func=_cmd_train)

    from .evaluate import EvaluateConfig

    p = sub.add_parser("evaluate", help="run a trained policy in the REAL game beside random and bot baselines")
    add_config_arguments(p, EvaluateConfig)
    p.set_defaults(func=_cmd_evaluate)

    try:
        from .play import add_play_arguments
    except ImportError:  # the play server module is optional until it lands
        add_play_arguments = None
    if add_play_arguments is not None:
        p = sub.add_parser("play", help="play a world in the browser (keyboard), served on 127.0.0.1")
        add_play_arguments(p)
        p.set_defaults(func=_cmd_play)

    from .demo import DemoConfig

    p = sub.add_parser("demo", help="the whole loop on a local Ray: collect, pretrain, levels, BC + PPO in "
                                    "imagination, real-game evaluation, report.html")
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="show installed versions and summarise a data directory")
    p.add_argument("--data", help="a directory written by `genie-sima collect`")
    p.add_argument("--verify", action="store_true", help="read every frame (checksums) while summarising --data")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input: printed as one line, no traceback."""
    from genie_world.bundle import BundleError
    from genie_world.config import WorldConfigError
    from genie_world.levels import LevelFileError
    from genie_world.text_encoder import UnknownWordsError
    from genie_world.world import InvalidActionError
    from sima_policy.instruction_tokenizer import UnknownWordsError as UnknownInstructionWords

    return (GenieSimaError, BundleError, WorldConfigError, LevelFileError, UnknownWordsError, InvalidActionError,
            UnknownInstructionWords)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except _user_errors() as e:
        # Raised inside a Ray actor/task, the error arrives as a RayTaskError carrying the remote traceback
        # in its text; its ``cause`` is the one-line message.
        print(f"genie-sima {args.command}: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genie-sima {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only a full disk or a file-size limit is turned into one line
        full = _disk_full(e)
        if full is None:
            raise
        print(f"genie-sima {args.command}: error: cannot write {full.filename or 'a file'}: {full.strerror} "
              "(free space or raise the limit, then re-run the same command; files already written are whole)",
              file=sys.stderr)
        return 2


def _disk_full(e: BaseException) -> OSError | None:
    """The OSError for a full disk, a quota or a file-size limit in ``e``'s chain of causes, if any."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return e
        # A Ray task's error arrives as a RayTaskError whose ``cause`` is the task's own exception.
        e = e.__cause__ or getattr(e, "cause", None) or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
