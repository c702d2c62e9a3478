"""collect -> pretrain (micro, all stages, real Ray Train + Ray Data) -> bundle loads -> metrics table."""

from __future__ import annotations

import json

import pytest
import torch

from genie_world.build import PART_NAMES
from genie_world.bundle import BundleError, load_bundle, save_part
from pipelines.errors import ConfigError
from pipelines.pretrain import PretrainArgs, pretrain
from tests.conftest import run_collect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_data")
    run_collect(out, episodes=60, policy="mixed", epsilon=0.3, episodes_per_shard=20, val_fraction=0.25)
    return out


def _events(run):
    path = run / "logs" / "pretrain_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pretrain_all_stages_writes_a_loadable_bundle(small_data, tmp_path):
    run = tmp_path / "run"
    result = pretrain(PretrainArgs(data=str(small_data), out=str(run), preset="micro", wandb="offline"),
                      log=lambda m: None)
    bundle = load_bundle(run)
    assert set(bundle.parts) == set(PART_NAMES)
    m = json.loads((run / "metrics.json").read_text())
    for key in ("tokenizer_psnr_db", "tokenizer_ssim", "next_frame_psnr_db", "copy_last_psnr_db", "dt_psnr_t4_db",
                "action_mapping_accuracy", "termination_accuracy", "reward_mae", "prior_distinct_levels_of_8"):
        assert key in m, key
    assert "| next_frame_psnr_db" in result["table"] and "| copy_last_psnr_db" in result["table"]
    assert m["adapter_labelled_transitions"] <= 200
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["provenance"]["episodes"] == 60 and meta["metrics"]["eval_clips"] > 0
    assert bundle.adapter is not None and bundle.adapter.num_real == 7
    assert bundle.constraints is not None and "level_constraint_groups" in m
    # Logging: TensorBoard event files and an offline wandb run per stage.
    assert list((run / "tensorboard").glob("*-tokenizer/events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))
    assert [e["stage"] for e in _events(run) if e["event"] == "finished"] == ["tokenizer", "actions", "dynamics", "heads", "prior"]
    # Re-running the finished command trains nothing again.
    again = pretrain(PretrainArgs(data=str(small_data), out=str(run), preset="micro", wandb="disabled"),
                     log=lambda m: None)
    assert len([e for e in _events(run) if e["event"] == "started"]) == 5
    assert again["metrics"]["tokenizer_psnr_db"] == m["tokenizer_psnr_db"]

    # A tokenizer re-trained after the parts trained on it (here: other weights saved as the tokenizer) makes
    # those parts stale: the bundle is refused naming both, a single stage re-run says which stay stale, and
    # `--stage all` re-trains exactly those (from scratch: their checkpoints were made on the old tokenizer).
    tokenizer = bundle.parts["tokenizer"]
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(0.01)
    save_part(run, "tokenizer", tokenizer)
    with pytest.raises(BundleError, match=r"part 'dynamics' was trained on tokenizer \w+, but the bundle's "
                                          r"tokenizer is \w+ \(tokenizer re-trained after dynamics\?\)"):
        load_bundle(run)
    load_bundle(run, parts=("tokenizer", "latent_actions"))  # parts that do not depend on it still load
    one = pretrain(PretrainArgs(data=str(small_data), out=str(run), preset="micro", stage="heads", wandb="disabled"),
                   log=lambda m: None)
    assert one["stale"] == [["dynamics", "tokenizer"], ["prompt_prior", "tokenizer"]]
    pretrain(PretrainArgs(data=str(small_data), out=str(run), preset="micro", wandb="disabled"), log=lambda m: None)
    assert [e["stage"] for e in _events(run) if e["event"] == "started"][5:] == ["heads", "dynamics", "prior"]
    assert set(load_bundle(run).parts) == set(PART_NAMES)


def test_changed_config_for_existing_run_is_refused(small_data, tmp_path):
    run = tmp_path / "run2"
    pretrain(PretrainArgs(data=str(small_data), out=str(run), stage="tokenizer", preset="micro", wandb="disabled"),
             {"tok_steps": 5}, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"holds a run with another config \(tok_width: 32 -> 48"):
        pretrain(PretrainArgs(data=str(small_data), out=str(run), stage="tokenizer", preset="micro"),
                 {"tok_steps": 5, "tok_width": 48}, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"stage dynamics needs \['latent_actions'\]"):
        pretrain(PretrainArgs(data=str(small_data), out=str(run), stage="dynamics", preset="micro"),
                 {"tok_steps": 5}, log=lambda m: None)


def test_two_ddp_workers_train_a_stage(small_data, tmp_path):
    run = tmp_path / "ddp"
    pretrain(PretrainArgs(data=str(small_data), out=str(run), stage="tokenizer", preset="micro", workers=2,
                          wandb="disabled"), {"tok_steps": 6}, log=lambda m: None)
    assert load_bundle(run, parts=("tokenizer",)).tokenizer is not None
    assert [e["step"] for e in _events(run) if e["event"] == "finished"] == [6]


def test_wrong_frame_size_is_refused(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"frames are 64x64 but the micro config expects frame_size 32"):
        pretrain(PretrainArgs(data=str(small_data), out=str(tmp_path / "r"), preset="micro"), {"frame_size": 32},
                 log=lambda m: None)
