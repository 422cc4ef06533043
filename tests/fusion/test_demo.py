"""Experiment presets (conf/experiment/*.yaml) and the demo that runs them end to end."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from fusion.demo import check_preset, fill, load_preset
from tests.conftest import ROOT, run_module

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def preset_words(name: str) -> tuple[list[str], list[str], list[str]]:
    p = load_preset(name)
    values = {"root": p["root"], "out": p["out"]}
    data = fill(p["data"], **values) + ([] if p["build"] else ["data.train=mine/train", "data.val=mine/val"])
    return data, fill(p["tokenizer"], **values), fill(p["decoder"], **values)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_its_models_build(name):
    """Each preset's tokenizer and decoder configs compose; the tokenizer encodes and decodes an image at the
    preset's resolution and the decoder takes a sequence of the preset's length."""
    from omegaconf import OmegaConf

    from fusion.decoder import Decoder, DecoderConfig
    from tokenizer.model import TokenizerConfig, VQTokenizer

    assert {"shapes_demo", "emoji", "folder_128", "folder_256"} <= set(PRESETS)
    plan = check_preset(name, *preset_words(name))
    tc = OmegaConf.to_container(plan["tokenizer"].tokenizer, resolve=True)
    tok = VQTokenizer(TokenizerConfig(**{k: v for k, v in tc.items() if k in TokenizerConfig.__dataclass_fields__}))
    res = plan["tokenizer"].data.resolution
    codes = tok.encode(torch.rand(1, 3, res, res))
    assert codes.shape[-2:] == (plan["grid"], plan["grid"])
    assert tok.decode(codes).shape == (1, 3, res, res)
    assert plan["span"] <= plan["decoder"].seq_len
    dc = plan["decoder"].decoder
    fields = {k: v for k, v in OmegaConf.to_container(dc, resolve=True).items() if k in DecoderConfig.__dataclass_fields__}
    model = Decoder(DecoderConfig(**{**fields, "image_pos_embed": False, "image_pos_values": False}), vocab_size=512 + plan["num_codes"] + 8)
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(1, plan["decoder"].seq_len, dtype=torch.long)).logits
    assert logits.shape == (1, plan["decoder"].seq_len, 512 + plan["num_codes"] + 8)


def test_bad_presets_fail_in_one_line_naming_the_fix(capsys):
    from data.runtime import UserError

    data, tok, dec = preset_words("shapes_demo")
    with pytest.raises(UserError, match="not divisible by the downsampling 4.*data.resolution"):
        check_preset("shapes_demo", [*data, "data.resolution=50"], tok, dec)
    data, tok, dec = preset_words("emoji")
    with pytest.raises(UserError, match=r"seq_len 200 cannot hold one image \(258 tokens.*seq_len >= 322"):
        check_preset("emoji", data, tok, [*dec, "seq_len=200"])
    with pytest.raises(UserError, match="experiment emoji: .*no_such_key"):
        check_preset("emoji", data, tok, [*dec, "train.no_such_key=1"])
    with pytest.raises(UserError, match="no experiment preset 'nope'; known: emoji, folder_128"):
        load_preset("nope")
    from fusion.demo import main

    assert main(["experiment=folder_128"]) == 2  # no shards named
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reads your shards: add 'data.train=" in err


@pytest.fixture(scope="session")
def emoji_root(tmp_path_factory):
    """The first 80 Noto colour emoji as shards: 70 to train on (more than one batch of 64), 10 held out; the font
    from the Debian package, fetched once per session."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not on this machine: the Noto font cannot be fetched")
    root = tmp_path_factory.mktemp("emoji")
    run_module("data.emoji", "--out", str(root), "--limit", "80", timeout=300)
    return root


@pytest.mark.slow
def test_emoji_experiment_runs_end_to_end_on_a_handful_of_glyphs(emoji_root, tmp_path):
    out = tmp_path / "run"
    proc = run_module("fusion.demo", "experiment=emoji", "--data", str(emoji_root), "--out", str(out),
                      "--tokenizer-steps", "6", "--decoder-steps", "6", "--tower-steps", "4",
                      "--eval", "open_world.train_images=4", "--eval", "open_world.show=3", timeout=900)
    assert "emoji summary" in proc.stdout and "retrieval top-1" in proc.stdout, proc.stdout[-3000:]
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["world"] is None and report["caption_test"]["tokens"] > 0
    assert report["precision"] in ("float32", "bfloat16")
    assert 0 <= report["caption_test"]["token_accuracy"] <= 1
    assert len(report["greedy_captions"]) == 3 and all("model" in c for c in report["greedy_captions"])
    ret = report["retrieval"]
    assert set(ret) == {"real_test", "reconstructed_test", "generated_test", "reconstructed_train", "generated_train"}
    assert ret["real_test"]["images"] == 10 and ret["real_test"]["candidates"] == 10  # 80 emoji, every 8th held out
    for png in ("generation_grid.png", "greedy_captions.png"):
        assert (out / "evaluation" / png).stat().st_size > 1000
    assert (out / "samples" / "grid.png").is_file()
    assert (out / "tower" / "clip" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name, resolution", [("folder_128", 128), ("folder_256", 256)])
def test_folder_preset_trains_a_few_steps_on_your_own_shards(name, resolution, shapes_root, tmp_path):
    """experiment=folder_128|folder_256 on shards they did not make (the shapes world's, upscaled): 8x or 16x
    tokenizer, the small decoder, the open-world evaluation; a few steps each."""
    out = tmp_path / "run"
    proc = run_module("fusion.demo", f"experiment={name}", f"data.train={shapes_root}/train",
                      f"data.val={shapes_root}/val", "--out", str(out), "--tokenizer-steps", "2", "--decoder-steps", "2",
                      "--tower-steps", "0", "--eval", "vqa_images=4", "--eval", "open_world.train_images=2",
                      "--eval", "open_world.show=2", timeout=900)
    assert "16 x 16 codes of 15360" in proc.stdout and f"{name} summary" in proc.stdout, proc.stdout[-3000:]
    meta = json.loads((out / "codes" / "_tokenizer.json").read_text())
    assert (meta["grid"], meta["num_codes"], meta["resolution"]) == (16, 15360, resolution)
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["caption_test"]["tokens"] > 0 and "retrieval" not in report
    assert report["precision"] in ("float32", "bfloat16")


@pytest.mark.slow
def test_shapes_demo_preset_runs_every_stage_for_a_few_steps(shapes_root, tmp_path):
    """What `make demo` runs, on the suite's small shapes world (already built: the data stage is skipped)."""
    out = tmp_path / "run"
    proc = run_module("fusion.demo", "--data", str(shapes_root), "--out", str(out), "--tokenizer-steps", "4",
                      "--decoder-steps", "4", "--eval", "vqa_images=10", "--eval", "generation.per_type=2",
                      timeout=900)
    assert "== data: done before" in proc.stdout and "shapes_demo summary" in proc.stdout, proc.stdout[-3000:]
    for line in ("VQA accuracy (test)", "generation judge", "ceiling (judge on "):
        assert line in proc.stdout, line
    assert (out / "samples" / "grid.png").is_file() and (out / "summary.txt").is_file()
    meta = json.loads((out / "codes" / "_tokenizer.json").read_text())
    assert meta["num_codes"] == 7 * 5 ** 4, meta   # the preset's FSQ grid, [7,5,5,5,5] (conf's default: 1,000)
