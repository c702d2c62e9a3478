"""Bad inputs refused with a message naming the thing and what was expected, and no partial output:
wrong-typed config values (CLI flags, the Python API, a bundle's config.json), frames of the wrong size
for a bundle, output directories that cannot be written, and a level file from another bundle (CLI and
world server). Other bad inputs have their own tests: see the README's Reliability table."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from genie_world.bundle import BundleError, load_bundle
from genie_world.levels import LevelFileError
from genie_world.world_builder import WorldBuilder
from genie_world.world_server import start_world_server
from pipelines.cli import main
from pipelines.errors import ConfigError
from pipelines.pretrain import PretrainArgs, pretrain
from tests.conftest import kill_process_tree, run_collect

PROMPT = "go to the red ball"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # some commands set the process's torch threads
    yield
    torch.set_num_threads(threads)


def _cli(capsys, *argv) -> tuple[int, str]:
    """``genie-sima ARGV`` in this process: (exit code, stderr). argparse errors exit via SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_bundle_levels(bundle_factory, tmp_path_factory) -> Path:
    """A level file made by another bundle (other weights, so another fingerprint)."""
    from genie_world.levels import save_levels

    root = tmp_path_factory.mktemp("other")
    other = load_bundle(bundle_factory(root / "bundle", seed=1))
    return save_levels(root / "levels.h5", WorldBuilder(other).generate(PROMPT, num_worlds=2, seed=0))


# --- config values of the wrong type ------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--tok-steps", "abc"], "argument --tok-steps: invalid int value: 'abc'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--tok-steps", "0"], "tok_steps: expected an integer >= 1, got 0"),
    (["--tok-batch", "-4"], "tok_batch: expected an integer >= 1, got -4"),
    (["--tok-change-weight", "0"], "tok_change_weight: expected a number > 0 (finite), got 0.0"),
    (["--lam-change-weight", "-1"], "lam_change_weight: expected a number >= 0 (finite), got -1.0"),
    (["--min-lr-ratio", "1.5"], "min_lr_ratio: expected a number >= 0 and <= 1, got 1.5"),
    (["--lr", "nan"], "lr: expected a number > 0 (finite), got nan"),
    (["--patch", "0"], "patch: expected an integer >= 1, got 0"),
    (["--tok-heads", "0"], "tok_width and tok_heads: expected integers >= 1, got"),
])
def test_pretrain_flags_of_wrong_type_or_value(babyai_mixed_data, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    rc, err = _cli(capsys, "pretrain", "--data", babyai_mixed_data, "--out", out, "--preset", "micro", *argv)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--bundle", "{bundle}", "--prompt", PROMPT, "--out", "{out}/l.h5", "--num-worlds", "many"],
     "argument --num-worlds: invalid int value: 'many'"),
    (["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}", "--num-envs", "4.5"],
     "argument --num-envs: invalid int value: '4.5'"),
    (["evaluate", "--baselines", "random", "--levels", "BabyAI-GoToRedBall-v0", "--episodes", "lots",
      "--out", "{out}"], "argument --episodes: invalid int value: 'lots'"),
    (["generate", "--bundle", "{bundle}", "--prompt", PROMPT, "--out", "{out}/l.h5", "--num-worlds", "0"],
     "--num-worlds must be >= 1, got 0"),
    (["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}", "--lr", "nan"],
     "--lr must be a finite number, got nan"),
    (["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}", "--gamma", "7"],
     "--gamma must be <= 1, got 7.0"),
    (["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}", "--language-coeff", "inf"],
     "--language-coeff must be a finite number, got inf"),
    (["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}", "--lr", "-1"],
     "--lr must be >= 0, got -1.0"),
    (["bc", "--bundle", "{bundle}", "--data", "{bundle}", "--out", "{out}", "--weight-decay", "-1"],
     "--weight-decay must be >= 0, got -1.0"),
    (["bc", "--bundle", "{bundle}", "--data", "{bundle}", "--out", "{out}", "--lr", "nan"],
     "--lr must be a finite number, got nan"),
])
def test_other_commands_refuse_flags_of_wrong_type(random_bundle, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc, err = _cli(capsys, *[a.format(bundle=random_bundle, out=out) for a in argv])
    assert rc == 2 and message in err, err
    assert "Traceback" not in err
    if not message.startswith("argument "):  # argparse's own errors come after its usage lines
        assert len([line for line in err.strip().splitlines() if "error" in line]) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ({"tok_steps": "abc"}, "tok_steps: expected int, got str 'abc'"),
    ({"lr": "fast"}, "lr: expected float, got str 'fast'"),
    ({"qk_norm": "yes"}, "qk_norm: expected bool, got str 'yes'"),
    ({"frame_size": 64.0}, "frame_size: expected int, got float 64.0"),
    ({"dyn_steps": True}, "dyn_steps: expected int, got bool True"),
])
def test_preset_override_of_wrong_type_through_the_python_api(babyai_mixed_data, tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        pretrain(PretrainArgs(data=str(babyai_mixed_data), out=str(out), preset="micro"), override, log=lambda m: None)
    assert not out.exists()


def test_bundle_config_field_of_wrong_type_names_the_file(random_bundle, tmp_path, capsys):
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["config"]["dyn_width"] = "32"  # hand-edited: a string where an int belongs
    (bundle / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"config\.json: invalid config: dyn_width: expected int, got str '32'") as e:
        load_bundle(bundle)
    assert str(bundle / "config.json") in str(e.value)
    rc, err = _cli(capsys, "generate", "--bundle", bundle, "--prompt", PROMPT, "--out", tmp_path / "o" / "l.h5")
    assert rc == 2 and "dyn_width: expected int, got str '32'" in err and not (tmp_path / "o" / "l.h5").exists()


# --- frames of the wrong size ------------------------------------------------------------------------

def test_frames_of_the_wrong_size_for_an_existing_bundle(ray_local, random_bundle, tmp_path, capsys):
    data32 = tmp_path / "data32"
    run_collect(data32, episodes=4, episodes_per_shard=4, frame_size=32)
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")  # a 64x64 micro bundle
    before = _digest(bundle)
    args = PretrainArgs(data=str(data32), out=str(bundle), stage="tokenizer", preset="micro")
    with pytest.raises(ConfigError, match=r"frames are 32x32 but the micro config expects frame_size 64; "
                                          r"pass --frame-size 32 or collect with --frame-size 64"):
        pretrain(args, {}, log=lambda m: None)
    # Following the hint for a directory that already holds a 64x64 bundle is refused too.
    with pytest.raises(ConfigError, match=r"holds a run with another config \(frame_size: 64 -> 32\)"):
        pretrain(args, {"frame_size": 32}, log=lambda m: None)
    assert _digest(bundle) == before
    # Cloning a policy from them through that bundle: refused before any labelling (was a size-mismatch
    # RuntimeError from inside the latent action model).
    out = tmp_path / "bc"
    rc, err = _cli(capsys, "bc", "--bundle", bundle, "--data", data32, "--out", out, "--steps", "1")
    assert rc == 2 and f"--data {data32}: frames are 32x32, but the world bundle {bundle} was trained on 64x64" in err, err
    assert "Traceback" not in err and not (out / "policy").exists()

    # An image prompt of the wrong size (generate --image).
    image = tmp_path / "start.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "levels"
    rc, err = _cli(capsys, "generate", "--bundle", bundle, "--image", image, "--mission", PROMPT,
                   "--out", out / "l.h5")
    assert rc == 2 and f"--image {image}: is 32x32, the bundle expects 64x64 RGB" in err, err
    assert not (out / "l.h5").exists() and not list(out.glob("*"))


# --- output directories that cannot be written ---------------------------------------------------------

def _locked_directory(tmp_path: Path) -> Path | None:
    """An existing directory this process cannot write: chmod works unless we are root; /proc/sys
    refuses even root. None when neither is available."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if not os.access(locked, os.W_OK):
        return locked
    return Path("/proc/sys") if not os.access("/proc/sys", os.W_OK) else None


COMMANDS = {
    "pretrain": ["pretrain", "--data", "{data}", "--preset", "micro", "--out", "{out}"],
    "generate": ["generate", "--bundle", "{bundle}", "--prompt", PROMPT, "--num-worlds", "2", "--out", "{out}/l.h5"],
    "generate-grid": ["generate", "--bundle", "{bundle}", "--prompt", PROMPT, "--num-worlds", "2",
                      "--out", "{tmp}/fine/l.h5", "--grid", "{out}/grid.png"],
    "evaluate": ["evaluate", "--baselines", "random", "--levels", "BabyAI-GoToRedBall-v0", "--episodes", "1",
                 "--out", "{out}"],
    "train": ["train", "--env", "babyai:BabyAI-GoToRedBall-v0", "--out", "{out}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_output_directories_that_cannot_be_written(babyai_mixed_data, random_bundle, tmp_path, capsys, command):
    def argv(out):
        fill = dict(data=babyai_mixed_data, bundle=random_bundle, out=out, tmp=tmp_path)
        return [a.format(**fill) for a in COMMANDS[command]]

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = _cli(capsys, *argv(blocker / "sub"))
    flag = "--grid directory" if command == "generate-grid" else (
        "--out directory" if command == "generate" else "--out")
    assert rc == 2 and f"{flag} {blocker / 'sub'}: cannot create directory" in err, err
    assert "Traceback" not in err and blocker.read_text() == "not a directory"
    assert not (tmp_path / "fine" / "l.h5").exists()  # generate checks every target before writing any

    locked = _locked_directory(tmp_path)
    try:
        if locked is None:
            pytest.skip("no directory here refuses writes to this user")
        rc, err = _cli(capsys, *argv(locked))
        assert rc == 2 and f"{locked}: directory is not writable" in err, err
    finally:
        os.chmod(tmp_path / "locked", 0o700)


# --- a level file from another bundle ------------------------------------------------------------------

def test_level_file_from_another_bundle_via_the_play_command(random_bundle, other_bundle_levels, capsys):
    rc, err = _cli(capsys, "play", "--bundle", random_bundle, "--level", other_bundle_levels, "--port", "0")
    assert rc == 2, err
    assert f"level file {other_bundle_levels}: made by world bundle" in err and "fingerprint" in err
    assert f"generate the levels again with `genie-sima generate --bundle {random_bundle}`" in err


def test_level_file_from_another_bundle_sent_to_a_world_server(ray_local, random_bundle, other_bundle_levels):
    server = start_world_server(random_bundle, name="inputs-world", num_cpus=0.5, capacity=8, max_episode_steps=6,
                                threads=1)
    try:
        with pytest.raises(LevelFileError) as e:  # the error itself crosses the actor boundary, not a pickling error
            ray.get(server.open.remote(2, level_file=str(other_bundle_levels)))
        assert e.value.path == str(other_bundle_levels) and "fingerprint" in e.value.problem
        assert ray.get(server.info.remote())["free"] == 8  # nothing was allocated
        opened = ray.get(server.open.remote(2, prompt=PROMPT))  # and the server keeps serving
        out = ray.get(server.step.remote(opened["client"], np.array([0, 1])))
        assert list(out["envs"]) == opened["envs"]
    finally:
        ray.kill(server)


def test_level_file_from_another_bundle_via_train(random_bundle, other_bundle_levels, tmp_path):
    out = tmp_path / "agent"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "train.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--env",
                                 f"world://{random_bundle}?level_file={other_bundle_levels}", "--out", str(out),
                                 "--num-envs", "2", "--rollout-steps", "8", "--total-timesteps", "16"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            proc.wait(timeout=90)  # a refusal took 18-30 s here; a retry loop never ends
        except subprocess.TimeoutExpired:
            kill_process_tree(proc)  # its own local Ray too
            pytest.fail("train did not refuse a level file of another bundle within 90 s (retrying the env "
                        f"forever?); last output:\n{log.read_text()[-2000:]}")
    stderr = log.read_text()
    assert proc.returncode == 2, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.startswith("genie-sima train: error:")]
    assert error and f"level file {other_bundle_levels}: made by world bundle" in error[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists() or not list(out.iterdir()), "a refused train left output behind"


def test_unknown_prompt_words_via_train_are_refused_before_anything_is_written(random_bundle, tmp_path):
    from genie_world.text_encoder import UnknownWordsError
    from pipelines.train_policy import TrainConfig, train

    out = tmp_path / "agent"
    with pytest.raises(UnknownWordsError, match=r"--env prompt='go to the zebra'.*unknown words \['zebra'\]"):
        train(TrainConfig(env=f"world://{random_bundle}?prompt=go to the zebra", out=str(out)), log=lambda m: None)
    with pytest.raises(ConfigError, match="num_levels='many' is not an integer"):
        train(TrainConfig(env=f"world://{random_bundle}?prompt=go to the red ball&num_levels=many", out=str(out)),
              log=lambda m: None)
    assert not out.exists()


# --- broken bundle files, level files, too little data, a full disk ----------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("vocab.json", "{not json", "vocab.json: not valid JSON"),
    ("vocab.json", '{"words": 5}', "vocab.json: not a valid vocabulary (ValueError: 'words' must be a list of strings"),
    ("vocab.json", "[]", "vocab.json: holds a JSON list, expected a dict"),
    ("action_adapter.json", '{"num_real": 7', "action_adapter.json: not valid JSON"),
    ("action_adapter.json", '{"num_real": 7}', "action_adapter.json: not a valid action adapter (KeyError"),
    ("metrics.json", '"fine"', "metrics.json: holds a JSON str, expected a dict"),
    ("metrics.json", "{", "metrics.json: not valid JSON"),
    ("config.json", "{}", "config.json: has no \"config\" object"),
    ("level_constraints.json", '{"exactly_one": [["a"]]}', "level_constraints.json: not a valid level constraints file"),
])
def test_broken_bundle_files_are_one_line_naming_the_file(random_bundle, tmp_path, capsys, name, content, message):
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")
    (bundle / name).write_text(content)
    out = tmp_path / "o" / "l.h5"
    rc, err = _cli(capsys, "generate", "--bundle", bundle, "--prompt", PROMPT, "--out", out)
    assert rc == 2 and f"world bundle {bundle / name}" in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def good_levels(random_bundle, tmp_path_factory) -> Path:
    from genie_world.levels import save_levels

    path = tmp_path_factory.mktemp("levels") / "levels.h5"
    return save_levels(path, WorldBuilder(load_bundle(random_bundle)).generate(PROMPT, num_worlds=3, seed=0))


def _edit_levels(good: Path, tmp_path: Path, edit) -> Path:
    import h5py

    path = tmp_path / "edited.h5"
    shutil.copy(good, path)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__delitem__("seed"), "attributes ['seed'] are missing"),
    (lambda f: [_replace(f, n, f[n][()][:0]) for n in ("first_tokens", "missions", "level_ids")],
     "holds no levels (generate some with `genie-sima generate`)"),
    (lambda f: _replace(f, "missions", f["missions"][()][:2]), "missions has shape (2,), expected (3,) for 3 levels"),
    (lambda f: _replace(f, "first_tokens", np.full(f["first_tokens"].shape, 40000, np.int32)),
     "token id 40000 is outside the bundle's codebook of"),
    (lambda f: _replace(f, "first_tokens", f["first_tokens"][()][:, :, None]),
     "first_tokens has shape (3, 64, 1), expected [levels, tokens per frame]"),
    # Declared, not written (HDF5 fills on read): refused from the shape, before 128 MB are read.
    (lambda f: (f.__delitem__("first_tokens"), f.create_dataset("first_tokens", shape=(1_000_001, 64), dtype=np.int16,
                                                                chunks=(1024, 64))),
     "first_tokens is 1000001 x 64; at most 1000000 levels of 16384 tokens are read"),
])
def test_level_files_that_cannot_be_played_are_one_line(random_bundle, good_levels, tmp_path, capsys, edit, message):
    path = _edit_levels(good_levels, tmp_path, edit)
    rc, err = _cli(capsys, "play", "--bundle", random_bundle, "--level", path, "--port", "0")
    assert rc == 2 and f"level file {path}: {message}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_level_tokens_over_int16_round_trip_and_empty_sets_are_not_saved(tmp_path):
    from genie_world.levels import LevelSet, load_levels, save_levels

    tokens = np.array([[0, 32767, 32768, 40000], [1, 2, 3, 65535]])  # int16 wrapped 40000 to -25536
    path = save_levels(tmp_path / "wide.h5", LevelSet(tokens, ["a", "b"], ["0", "1"], "fp"))
    back = load_levels(path)
    assert back.first_tokens.tolist() == tokens.tolist()
    narrow = save_levels(tmp_path / "narrow.h5", LevelSet(tokens % 32768, ["a", "b"], ["0", "1"], "fp"))
    assert narrow.stat().st_size <= path.stat().st_size  # ids that fit int16 are still stored as int16
    with pytest.raises(LevelFileError, match="no levels to save"):
        save_levels(tmp_path / "empty.h5", LevelSet(np.zeros((0, 4), np.int64), [], [], "fp"))
    assert not (tmp_path / "empty.h5").exists()
    with pytest.raises(ValueError, match="first_tokens must be >= 0"):
        LevelSet(-tokens, ["a", "b"], ["0", "1"], "fp")


def test_train_on_a_bundle_missing_a_part_names_the_part_before_anything_starts(random_bundle, tmp_path, capsys):
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")
    meta = json.loads((bundle / "bundle.json").read_text())
    del meta["parts"]["dynamics"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    out = tmp_path / "agent"
    rc, err = _cli(capsys, "train", "--env", f"world://{bundle}?prompt={PROMPT}", "--out", out)
    assert rc == 2 and f"world bundle {bundle}: part 'dynamics' is missing" in err, err  # was an ActorDiedError
    assert "Traceback" not in err and not out.exists()


def test_pretraining_data_with_fewer_clips_than_a_batch_is_refused_before_any_stage(babyai_mixed_data, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    rc, err = _cli(capsys, "pretrain", "--data", babyai_mixed_data, "--out", out, "--preset", "micro",
                   "--prior-batch", "4096")
    assert rc == 2 and (f"--data {babyai_mixed_data}: stage prior needs at least 4096 first frames in the training "
                        "split (--prior-batch 4096 x 1 worker(s)), the data has") in err, err
    assert "Traceback" not in err and not out.exists()  # the stages before it did not run either


def test_a_full_disk_is_one_line_and_leaves_the_previous_file_whole(random_bundle, tmp_path):
    """A real write past the process's file-size limit (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC)."""
    import resource

    out = tmp_path / "levels.h5"
    argv = [sys.executable, "-m", "pipelines.cli", "generate", "--bundle", str(random_bundle), "--prompt", PROMPT,
            "--out", str(out)]
    subprocess.run(argv + ["--num-worlds", "2"], check=True, capture_output=True)
    before = out.read_bytes()
    limit = len(before) + 2048  # room for the config beside it, not for 512 levels

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(argv + ["--num-worlds", "512"], preexec_fn=small_files, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"genie-sima generate: error: cannot write {out}: File too large (free space or "
                                   "raise the limit, then re-run the same command; files already written are whole)")
    assert out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
