"""World bundle save/load round trip and the refusals that protect users from mismatched parts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from genie_world.build import PART_NAMES, build_part
from genie_world.bundle import BundleError, load_bundle, save_json, save_part, stale_parts, update_bundle_meta
from genie_world.config import resolve_config
from genie_world.text_encoder import Vocabulary


@pytest.fixture
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    cfg = resolve_config("micro")
    vocab = Vocabulary.from_texts(["go to the red ball", "pick up the blue key"])
    run = tmp_path / "run"
    run.mkdir()
    save_json(run, "config.json", {"config": dataclasses.asdict(cfg)})
    save_json(run, "vocab.json", vocab.to_json())
    models = {}
    for name in PART_NAMES:
        models[name] = build_part(name, cfg, len(vocab))
        save_part(run, name, models[name])
    update_bundle_meta(run, provenance={"data_dir": "/data"})
    return run, models


def test_round_trip(bundle_dir):
    run, models = bundle_dir
    bundle = load_bundle(run)
    assert set(bundle.parts) == set(PART_NAMES)
    for name, model in models.items():
        for (k, v), (k2, v2) in zip(model.state_dict().items(), bundle.parts[name].state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    assert bundle.dynamics is bundle.parts["dynamics"] and not bundle.dynamics.training
    assert bundle.vocab.words == Vocabulary.from_texts(["go to the red ball", "pick up the blue key"]).words
    assert len(bundle.fingerprint) == 16
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["schema_version"] == 2 and meta["parts"]["tokenizer"]["params"] > 0
    # Loading a subset of parts works and leaves the rest out.
    assert set(load_bundle(run, parts=("tokenizer",)).parts) == {"tokenizer"}


def test_missing_bundle_json(tmp_path):
    with pytest.raises(BundleError, match=r"bundle\.json does not exist"):
        load_bundle(tmp_path)


def test_other_schema_version(bundle_dir):
    run, _ = bundle_dir
    update_bundle_meta(run, schema_version=7)
    with pytest.raises(BundleError, match=r"schema_version is 7, this genie-sima reads schema_version 2"):
        load_bundle(run)


def test_missing_part(bundle_dir):
    run, _ = bundle_dir
    (run / "dynamics.safetensors").unlink()
    with pytest.raises(BundleError, match=r"dynamics\.safetensors: weights file of part 'dynamics' does not exist"):
        load_bundle(run)
    meta = json.loads((run / "bundle.json").read_text())
    del meta["parts"]["dynamics"]
    (run / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"part 'dynamics' is missing"):
        load_bundle(run)


def test_a_part_trained_on_another_tokenizer_is_refused_naming_both(bundle_dir):
    run, models = bundle_dir
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["parts"]["dynamics"]["trained_on"] == {d: meta["parts"][d]["sha256"] for d in ("tokenizer", "latent_actions")}
    with torch.no_grad():
        next(models["tokenizer"].parameters()).add_(1.0)
    save_part(run, "tokenizer", models["tokenizer"])  # a tokenizer re-trained after the parts that read it
    assert stale_parts(json.loads((run / "bundle.json").read_text())) == [
        ("dynamics", "tokenizer"), ("reward_head", "tokenizer"), ("prompt_prior", "tokenizer")]
    with pytest.raises(BundleError, match=r"bundle\.json: part 'dynamics' was trained on tokenizer [0-9a-f]{12}, but "
                                          r"the bundle's tokenizer is [0-9a-f]{12}.*--stage all"):
        load_bundle(run)
    assert set(load_bundle(run, parts=("tokenizer", "latent_actions")).parts) == {"tokenizer", "latent_actions"}
    save_part(run, "dynamics", models["dynamics"])  # re-trained on the new one: fresh again
    with pytest.raises(BundleError, match=r"part 'reward_head' was trained on tokenizer"):
        load_bundle(run)


def test_altered_weights(bundle_dir):
    run, _ = bundle_dir
    other = build_part("tokenizer", resolve_config("micro"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "tokenizer.safetensors"))
    with pytest.raises(BundleError, match=r"sha256 does not match bundle\.json: the weights of part 'tokenizer' were altered"):
        load_bundle(run)


def test_weights_that_do_not_fit_the_config(bundle_dir):
    run, _ = bundle_dir
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["dyn_width"] = 64
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"weights of part 'dynamics' do not match config\.json"):
        load_bundle(run, parts=("dynamics",))


def test_not_a_bundle_format(bundle_dir):
    run, _ = bundle_dir
    update_bundle_meta(run, format="something-else")
    with pytest.raises(BundleError, match=r"format is 'something-else', expected 'genie-sima-world-bundle'"):
        load_bundle(run)
