"""World bundle: one directory per run with every part's weights, config, vocabulary, adapter,
metrics and provenance, under a schema version.

    RUN/bundle.json              format, schema_version, parts {name: file, sha256, params}, provenance
    RUN/config.json              the resolved WorldModelConfig
    RUN/<part>.safetensors       tokenizer, latent_actions, dynamics, reward_head, prompt_prior
    RUN/vocab.json               mission/prompt vocabulary
    RUN/action_adapter.json      real <-> latent action table
    RUN/action_adapter.safetensors  the adapter's key -> latent model (when action_adapter.json names one)
    RUN/metrics.json             the evaluation table
    RUN/level_constraints.json   facts real first frames obey (optional; see level_constraints.py)

``load_bundle`` refuses, naming the file and the problem, a bundle of another schema, a missing or
altered part, or weights that do not fit the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .action_adapter import ActionAdapter
from .atomic_files import write_file_atomic, write_json_atomic
from .build import PART_DEPENDENCIES, PART_NAMES, build_part
from .config import WorldConfigError, WorldModelConfig
from .level_constraints import FILE as CONSTRAINTS_FILE, LevelConstraints
from .text_encoder import Vocabulary

FORMAT = "genie-sima-world-bundle"
SCHEMA_VERSION = 2  # 2: the reward/termination head reads the token grid with convolutions (was a transformer)


class BundleError(ValueError):
    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"world bundle {self.path}: {problem}")

    def __reduce__(self):
        # Ray re-raises an actor's error in the caller by pickling it; the default reduce passes only the
        # message, so without this the caller got "Failed to deserialize exception" instead of this error.
        return type(self), (self.path, self.problem)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bundle_meta(run: Path) -> dict:
    path = Path(run) / "bundle.json"
    if not path.exists():
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "parts": {}, "provenance": {}}
    return json.loads(path.read_text())


def save_part(run: Path, name: str, model: torch.nn.Module, trained_on: dict[str, str] | None = None) -> None:
    """Write one part's weights atomically and record it (with its hash) in bundle.json; ``trained_on``
    maps each part it was trained against (frozen) to that part's sha256 (default: the bundle's current
    ``PART_DEPENDENCIES``), so a later re-run of one of those stages shows this part as stale
    (``stale_parts``) instead of leaving the two silently mismatched."""
    run = Path(run)
    if name not in PART_NAMES:
        raise ValueError(f"unknown part {name!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = run / f"{name}.safetensors"
    write_file_atomic(path, lambda p: save_file(state, str(p), metadata={"part": name, "schema_version": str(SCHEMA_VERSION)}))
    meta = read_bundle_meta(run)
    if trained_on is None:
        trained_on = {d: meta["parts"][d]["sha256"] for d in PART_DEPENDENCIES[name] if d in meta["parts"]}
    meta["parts"][name] = {"file": path.name, "sha256": _sha256(path),
                           "params": int(sum(v.numel() for v in state.values())), "trained_on": dict(trained_on)}
    write_json_atomic(run / "bundle.json", meta)


def stale_parts(meta: dict, names=None) -> list[tuple[str, str]]:
    """(part, dependency) pairs among ``names`` (default: every part) whose recorded dependency hash is
    not the bundle's current one (or whose dependency is gone). Bundles written before parts recorded
    their dependencies have nothing to compare and report none."""
    parts = meta.get("parts", {})
    out = []
    for name in sorted(parts, key=lambda n: PART_NAMES.index(n) if n in PART_NAMES else len(PART_NAMES)) \
            if names is None else names:
        for dep, sha in (parts.get(name, {}).get("trained_on") or {}).items():
            if parts.get(dep, {}).get("sha256") != sha:
                out.append((name, dep))
    return out


def save_json(run: Path, name: str, obj) -> None:
    write_json_atomic(Path(run) / name, obj)


def update_bundle_meta(run: Path, **fields) -> None:
    meta = read_bundle_meta(run)
    meta.update(fields)
    write_json_atomic(Path(run) / "bundle.json", meta)


@dataclass
class WorldBundle:
    path: Path
    config: WorldModelConfig
    vocab: Vocabulary | None
    adapter: ActionAdapter | None
    parts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    constraints: LevelConstraints | None = None

    def __getattr__(self, name):
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(name)

    @property
    def fingerprint(self) -> str:
        """Identifies these exact weights: level files record it and are refused by other bundles."""
        h = hashlib.sha256()
        for name in sorted(self.meta.get("parts", {})):
            h.update(f"{name}:{self.meta['parts'][name]['sha256']};".encode())
        return h.hexdigest()[:16]


ADAPTER_WEIGHTS = "action_adapter.safetensors"


def save_adapter(run: Path, adapter: ActionAdapter) -> None:
    """action_adapter.json, and its key model's weights beside it, each written atomically."""
    run = Path(run)
    if adapter.key_model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in adapter.key_model.state_dict().items()}
        write_file_atomic(run / ADAPTER_WEIGHTS, lambda p: save_file(state, str(p)))
    write_json_atomic(run / "action_adapter.json", adapter.to_json())


def _read_json(path: Path, expect: type = dict):
    """A bundle file's JSON, or BundleError naming the file (a hand-edited or truncated file otherwise
    surfaced as a JSONDecodeError or TypeError far from it)."""
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(path, f"not valid JSON ({e})") from e
    if not isinstance(d, expect):
        raise BundleError(path, f"holds a JSON {type(d).__name__}, expected a {expect.__name__}")
    return d


def _from_json(path: Path, what: str, build):
    """``build(json of path)``, with any error in the file's contents named as the file's."""
    d = _read_json(path)
    try:
        return build(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        text = (str(e).splitlines() or [""])[0]
        raise BundleError(path, f"not a valid {what} ({type(e).__name__}: {text})") from e


def _load_adapter(path: Path) -> ActionAdapter:
    d = _read_json(path)
    state = None
    if "key_model" in d:
        weights = path.parent / ADAPTER_WEIGHTS
        if not weights.exists():
            raise BundleError(weights, "does not exist, but action_adapter.json names a key model")
        try:
            state = load_file(str(weights))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise BundleError(weights, f"cannot be read as safetensors ({e})") from e
    try:
        return ActionAdapter.from_json(d, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BundleError(path, f"not a valid action adapter ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def load_bundle(run, parts=PART_NAMES, device: str | torch.device = "cpu", verify_hashes: bool = True) -> WorldBundle:
    run = Path(run)
    meta_path = run / "bundle.json"
    if not meta_path.exists():
        raise BundleError(run, "bundle.json does not exist (is this a `genie-sima pretrain --out` directory?)")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise BundleError(meta_path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(meta_path, f"schema_version is {meta.get('schema_version')!r}, this genie-sima reads "
                                     f"schema_version {SCHEMA_VERSION}; re-run pretraining with this version")
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise BundleError(run, "config.json is missing")
    cfg_dict = _read_json(cfg_path).get("config")
    if not isinstance(cfg_dict, dict):
        raise BundleError(cfg_path, "has no \"config\" object (the resolved WorldModelConfig)")
    known = {f.name for f in dataclasses.fields(WorldModelConfig)}
    extra = sorted(set(cfg_dict) - known)
    if extra:
        raise BundleError(cfg_path, f"unknown config fields {extra} (written by another genie-sima version?)")
    cfg = WorldModelConfig(**cfg_dict)
    try:
        cfg.validate()  # a hand-edited field of the wrong type otherwise failed later, far from the file
    except WorldConfigError as e:
        raise BundleError(cfg_path, f"invalid config: {e}") from e
    vocab_path = run / "vocab.json"
    vocab = _from_json(vocab_path, "vocabulary", Vocabulary.from_json) if vocab_path.exists() else None
    adapter_path = run / "action_adapter.json"
    adapter = _load_adapter(adapter_path) if adapter_path.exists() else None
    bundle = WorldBundle(run, cfg, vocab, adapter, meta=meta)
    if (run / "metrics.json").exists():
        bundle.metrics = _read_json(run / "metrics.json")
    if (run / CONSTRAINTS_FILE).exists():
        bundle.constraints = _from_json(run / CONSTRAINTS_FILE, "level constraints file", LevelConstraints.from_json)
    for name, dep in stale_parts(meta, [n for n in parts if n in meta.get("parts", {})]):
        have = meta["parts"].get(dep, {}).get("sha256", "")
        raise BundleError(meta_path, f"part {name!r} was trained on {dep} {meta['parts'][name]['trained_on'][dep][:12]}, "
                                     f"but the bundle's {dep} is " + (f"{have[:12]}" if have else "missing")
                                     + f" ({dep} re-trained after {name}?): re-run `genie-sima pretrain --out {run} "
                                     "--stage all`, which re-trains the parts that depend on a changed one")
    for name in parts:
        info = meta.get("parts", {}).get(name)
        if info is None:
            raise BundleError(run, f"part {name!r} is missing (bundle has {sorted(meta.get('parts', {}))}); "
                                   f"run `genie-sima pretrain` for its stage")
        path = run / info["file"]
        if not path.exists():
            raise BundleError(path, f"weights file of part {name!r} does not exist")
        if verify_hashes and _sha256(path) != info["sha256"]:
            raise BundleError(path, f"sha256 does not match bundle.json: the weights of part {name!r} were altered")
        if name in ("reward_head", "prompt_prior") and vocab is None:
            raise BundleError(run, "vocab.json is missing")
        model = build_part(name, cfg, len(vocab) if vocab else 0)
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise BundleError(path, f"cannot be read as safetensors ({e})") from e
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(path, f"weights of part {name!r} do not match config.json: {str(e).splitlines()[0]} "
                                    f"({str(e).count('size mismatch')} size mismatches)") from e
        bundle.parts[name] = model.to(device).eval()
    return bundle
