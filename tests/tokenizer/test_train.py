"""End to end, as a user runs it: train (Hydra + Lightning), evaluate, pre-tokenize, sweep."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, TINY_TOKENIZER, run_module
from tokenizer.pretokenize import codes_from_bytes

TINY = TINY_TOKENIZER


@pytest.fixture(scope="module")
def trained(tiny_tokenizer) -> Path:
    return tiny_tokenizer


@pytest.mark.slow
def test_training_writes_weights_config_and_metrics(trained):
    assert (trained / "tokenizer" / "model.safetensors").is_file()
    meta = json.loads((trained / "tokenizer" / "config.json").read_text())
    assert meta["grid"] == 12 and meta["num_codes"] == 64 and meta["train_steps"] == 12
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["tokenizer"]["resolution"] == 48 and "${" not in (trained / "config.yaml").read_text()
    m = json.loads((trained / "metrics.json").read_text())
    assert m["images"] == 100 and 5 < m["psnr"] < 100 and 0 < m["code_usage"] <= 1
    assert (trained / "val_reconstructions.png").is_file() and (trained / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "logs" / "metrics.csv").is_file()


@pytest.mark.slow
def test_evaluate_command_writes_json_and_grid(trained, shapes_root):
    proc = run_module("tokenizer.evaluate", f"tokenizer_dir={trained / 'tokenizer'}", f"data.root={shapes_root}",
                      f"run_dir={trained / 'eval'}", "split=holdout")
    m = json.loads((trained / "eval" / "holdout_metrics.json").read_text())
    assert m["images"] == 100 and m["encode_images_per_s"] > 0 and "PSNR" in proc.stdout
    # the conv encoder writes one flat colour with several codes; the judge ran on 160 prompts per type
    assert m["code_given_patch_nats"] >= 0 and set(m["codes_per_flat_patch"]) and "H(code|patch)" in proc.stdout
    assert m["ceiling"]["n"] == 5 * 160 and 0 <= m["ceiling"]["pass_rate"] <= 1
    assert set(m["ceiling"]["attributes"]) == {"colour", "shape", "count", "cell"}
    assert (trained / "eval" / "holdout_reconstructions.png").is_file()


@pytest.mark.slow
def test_pretokenize_is_parallel_resumable_and_carries_text(trained, shapes_root, tmp_path):
    out = tmp_path / "codes"
    args = [f"tokenizer_dir={trained / 'tokenizer'}", f"data.root={shapes_root}", f"out={out}",
            "splits=[train,val]", "workers=2", "batch_size=32"]
    # from another folder, with a relative tokenizer_dir: the codes record where it is absolutely
    run_module("tokenizer.pretokenize", "tokenizer_dir=tokenizer", *args[1:], cwd=trained, env={"PYTHONPATH": str(ROOT)})
    assert json.loads((out / "_tokenizer.json").read_text())["tokenizer_dir"] == str((trained / "tokenizer").resolve())
    shards = sorted((out / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    with tarfile.open(shards[0]) as t:
        names = t.getnames()
        assert sorted(names[:3]) == ["000000000.codes.npy", "000000000.json", "000000000.txt"]
        codes = codes_from_bytes(t.extractfile("000000000.codes.npy").read())
        caption = t.extractfile("000000000.txt").read().decode()
    assert codes.shape == (12, 12) and codes.dtype == np.uint16 and int(codes.max()) < 64
    assert len(caption) > 10
    # resume: a finished shard is not redone, a missing one is
    shards[1].unlink()
    mtime = shards[0].stat().st_mtime_ns
    proc = run_module("tokenizer.pretokenize", *args)
    assert shards[1].is_file() and shards[0].stat().st_mtime_ns == mtime
    assert "3 of 4 shards were already done" in proc.stdout


@pytest.mark.slow
def test_pretokenize_refuses_codes_from_another_tokenizer(trained, shapes_root, tmp_path):
    out = tmp_path / "codes"
    (out).mkdir()
    (out / "_tokenizer.json").write_text(json.dumps({"fingerprint": "0123456789abcdef", "tokenizer_dir": "old"}))
    proc = run_module("tokenizer.pretokenize", f"tokenizer_dir={trained / 'tokenizer'}", f"data.root={shapes_root}",
                      f"out={out}", check=False)
    assert proc.returncode == 2 and "holds codes from tokenizer 0123456789abcdef" in proc.stderr


@pytest.mark.slow
def test_hydra_sweep_over_quantizers(shapes_root, tmp_path):
    proc = run_module("tokenizer.train", "-m", "quantizer=vq,fsq", f"data.root={shapes_root}",
                      f"hydra.sweep.dir={tmp_path}", *[a for a in TINY if not a.startswith(("trainer.max_steps", "quantizer="))],
                      "trainer.max_steps=6", "tokenizer.fsq_levels=[4,4,4]")
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2, proc.stdout[-2000:]
    kinds = [json.loads((r / "tokenizer" / "config.json").read_text())["config"]["quantizer"] for r in runs]
    assert kinds == ["vq", "fsq"]
    for r in runs:
        assert (r / "config.yaml").is_file() and (r / "metrics.json").is_file()


def test_unreadable_input_is_one_line(tmp_path):
    proc = run_module("tokenizer.train", f"data.root={tmp_path}/none", f"run_dir={tmp_path}/run", *TINY, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no shard matches")
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_learning_rate_schedule_is_a_config_switch(schedule):
    """train.schedule reaches the tokenizer's optimizer: wsd holds the rate flat until the last decay_frac of the
    steps, cosine is half-way down at half-way (README screen 31: wsd passes the ceiling 500 steps sooner)."""
    from hydra import compose, initialize_config_dir

    from data.runtime import adamw_with_schedule
    from tokenizer.train import build_module

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="train_tokenizer", overrides=[*TINY, f"train.schedule={schedule}", "train.warmup_steps=0"])
    module = build_module(cfg, grid_dir=None)
    assert module.hparams.optim["schedule"] == schedule
    _, config = adamw_with_schedule(module.named_parameters(), module.hparams.optim, 100)
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"] / cfg.train.lr)
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[99] < 0.1
    if schedule == "wsd":
        assert lrs[79] == pytest.approx(1.0) and lrs[90] < 0.6
    else:
        assert lrs[50] == pytest.approx(0.5, abs=0.05) and lrs[79] < 0.25
