"""The CLIP-connector baseline: placeholder/feature count check, local tower loading, a frozen tower,
and a two-run Hydra sweep (arm=fusion,adapter) collected into an ablation report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.runtime import UserError
from fusion.adapter import Connector, ImageEncoder, TowerConfig, build_tower, insert_image_features
from tests.conftest import run_module
from tests.fusion.test_train import TINY

TINY_TOWER = ["tower.hidden_size=32", "tower.num_layers=2", "tower.num_heads=2", "tower.intermediate_size=64",
              "text.train_samples=200", "text.vocab_size=300", "text.hidden_size=32", "train.batch_size=16",
              "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
              "train.warmup_steps=2"]


def test_features_fill_placeholders_in_reading_order():
    ids = torch.tensor([[1, 9, 9, 2, 9, 9], [9, 9, 3, 4, 5, 6]])
    feats = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    out = insert_image_features(torch.zeros(2, 6, 4), ids, placeholder=9, features=feats)
    assert torch.equal(out[0, 1:3], feats[0]) and torch.equal(out[0, 4:6], feats[1]) and torch.equal(out[1, :2], feats[2])
    assert torch.equal(out[0, 0], torch.zeros(4)) and torch.equal(out[1, 2:], torch.zeros(4, 4))


@pytest.mark.parametrize("n_images", [2, 4])
def test_placeholder_and_feature_counts_must_agree(n_images):
    ids = torch.tensor([[1, 9, 9, 2, 9, 9], [9, 9, 3, 4, 5, 6]])  # 3 images x 2 placeholders
    with pytest.raises(ValueError, match="6 image placeholders in the batch but"):
        insert_image_features(torch.zeros(2, 6, 4), ids, 9, torch.zeros(n_images, 2, 4))


@pytest.mark.parametrize("kind, tokens", [("mlp2x_gelu", 36), ("linear", 36), ("pixel_shuffle", 9)])
def test_connectors_map_patches_to_decoder_tokens(kind, tokens):
    c = Connector(kind, d_vision=16, d_model=24, grid=6)
    assert c.tokens_per_image() == tokens and c(torch.randn(2, 36, 16)).shape == (2, tokens, 24)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_loads_from_a_local_folder(kind, tmp_path):
    cfg = TowerConfig(kind=kind, image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64)
    saved = build_tower(cfg)
    saved.save_pretrained(tmp_path / "tower")
    enc = ImageEncoder(TowerConfig(**{**cfg.to_dict(), "pretrained": str(tmp_path / "tower")}), "mlp2x_gelu", 24)
    for name, t in saved.state_dict().items():
        assert torch.equal(enc.tower.state_dict()[name], t), name
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 16, 24)


def test_a_missing_tower_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot load a clip vision tower from"):
        build_tower(TowerConfig(pretrained=str(tmp_path / "nowhere")))


@pytest.fixture(scope="module")
def tower(shapes_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tower")
    run_module("fusion.pretrain_tower", f"data.root={shapes_root}", f"run_dir={run}", *TINY_TOWER)
    assert json.loads((run / "tower_summary.json").read_text())["steps"] == 6
    return run / "tower"


@pytest.fixture(scope="module")
def sweep(tower, tiny_codes, shapes_root, tmp_path_factory) -> Path:
    """`python -m fusion.train -m arm=fusion,adapter`: Hydra's basic launcher, one process, runs in turn."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    tower_args = [a for a in TINY_TOWER if a.startswith("tower.")]
    run_module("fusion.train", "-m", "arm=fusion,adapter", f"codes={tiny_codes}", f"data.root={shapes_root}",
               f"tower.pretrained={tower}", *tower_args, f"hydra.sweep.dir={out}", *TINY, timeout=900)
    return out


@pytest.mark.slow
def test_sweep_runs_each_arm_in_its_own_folder(sweep):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    arms = {}
    for r in runs:
        assert (r / "config.yaml").is_file() and (r / "model" / "decoder.json").is_file()
        arms["image_encoder" in json.loads((r / "model" / "decoder.json").read_text())] = r
        assert json.loads((r / "train_summary.json").read_text())["steps"] == 16
    assert arms == {False: runs[0], True: runs[1]}  # arm=fusion, then arm=adapter
    assert (runs[1] / "model" / "image_encoder.safetensors").is_file()
    assert not (runs[0] / "model" / "image_encoder.safetensors").exists()


@pytest.mark.slow
def test_frozen_tower_is_unchanged_by_training(sweep, tower):
    pretrained = load_file(str(tower / "model.safetensors"))
    trained = load_file(str(sweep / "1" / "model" / "image_encoder.safetensors"))
    tower_keys = [k for k in trained if k.startswith("tower.")]
    assert tower_keys and len(tower_keys) == len(pretrained)
    for k in tower_keys:
        assert torch.equal(trained[k], pretrained[k.removeprefix("tower.")]), k
    connector = [k for k in trained if k.startswith("connector.")]
    assert connector  # the connector is what the adapter trains


@pytest.mark.slow
def test_sweep_is_collected_into_an_ablation_report(sweep, tiny_codes, shapes_root, tmp_path):
    out = tmp_path / "report"
    run_module("fusion.ablate", f"codes={tiny_codes}", f"data.root={shapes_root}", f"collect={sweep}",
               f"run_dir={out}", 'eval_overrides=["vqa_images=8","max_questions=16","generation.per_type=1"]',
               timeout=900)
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["arms"]) == {"fusion", "adapter"}
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert {r["arm"] for r in rows} == {"fusion", "adapter"}
    md = (out / "ablation.md").read_text()
    assert "cannot write them" in md
    assert (out / "val_text_ce_vs_flops.png").stat().st_size > 1000
