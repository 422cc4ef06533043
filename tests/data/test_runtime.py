"""Run plumbing: atomic checkpoints, safe loading, resume checks, precision choice, FSDP on CPU."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from data.runtime import (UserError, _atomic_checkpoint_io, inference_dtype, load_checkpoint_safely, make_strategy, resolve_precision,
                          resume_checkpoint, warmup_cosine)


class Explodes:
    """Pickling this object fails half-way through a save, like a process killed mid-write."""

    def __reduce__(self):
        raise KeyboardInterrupt("killed mid-save")


def test_a_save_interrupted_half_way_leaves_the_previous_checkpoint_whole(tmp_path):
    io = _atomic_checkpoint_io()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "w": torch.ones(1000)}, path)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 20, "w": torch.zeros(1000), "boom": Explodes()}, path)
    back = io.load_checkpoint(path)
    assert back["global_step"] == 10 and torch.equal(back["w"], torch.ones(1000))


class Payload:
    """A crafted checkpoint: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload(marker)}, f)
    with pytest.raises(UserError, match="refusing to load") as e:
        load_checkpoint_safely(evil)
    assert "\n" not in str(e.value) and not marker.exists()
    with pytest.raises(UserError, match="refusing to load"):
        resume_checkpoint(str(evil), tmp_path)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints_fail_in_one_line(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(4096)}, "hyper_parameters": {}}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as e:
        load_checkpoint_safely(cut)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint_safely(tmp_path / "nope.ckpt")


def test_resume_refuses_a_checkpoint_from_another_vocabulary(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"hyper_parameters": {"vocab_fingerprint": "aaaa"}}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match="vocab_fingerprint='aaaa', this run has 'bbbb'"):
        resume_checkpoint("auto", tmp_path, expect={"vocab_fingerprint": "bbbb"})
    assert resume_checkpoint("auto", tmp_path, expect={"vocab_fingerprint": "aaaa"}).endswith("last.ckpt")
    assert resume_checkpoint("auto", tmp_path / "fresh") is None


def test_fsdp_on_cpu_says_it_needs_a_gpu():
    with pytest.raises(UserError, match="FSDP needs a GPU"):
        make_strategy("fsdp", 60, {"activation_checkpointing": True}, "cpu")


def test_precision_auto_picks_a_real_setting():
    assert resolve_precision("auto", "cpu") in ("32-true", "bf16-mixed")
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"


def test_inference_dtype_follows_the_measured_choice_and_refuses_the_rest():
    assert inference_dtype("fp32") == torch.float32 and inference_dtype("bf16") == torch.bfloat16
    assert inference_dtype("auto") == (torch.bfloat16 if resolve_precision("auto", "cpu") == "bf16-mixed" else torch.float32)
    with pytest.raises(UserError, match="auto, fp32 or bf16"):
        inference_dtype("fp16")


def test_schedule_warms_up_then_decays():
    assert warmup_cosine(0, 10, 0.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(50, 10, 0.5, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(99, 10, 1.0, 0.1) == pytest.approx(0.1)


class Poisoned:
    """A tiny regression trained by Lightning whose loss turns NaN on chosen batches."""

    @staticmethod
    def make(nan_loss=(), max_skipped=20):
        import lightning as L
        from torch import nn

        from data.runtime import ScheduledTraining, adamw_with_schedule

        class Module(ScheduledTraining, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 1)
                self.max_skipped_steps = max_skipped

            def training_step(self, batch, i):
                x, y = batch
                loss = ((self.lin(x) - y) ** 2).mean()
                if i in nan_loss:
                    loss = loss * float("nan")
                return self.finite_or_skip(loss)

            def configure_optimizers(self):
                o = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0}
                self.clock, opt = adamw_with_schedule(self.named_parameters(), o, max_steps=8)
                return opt

        return Module()


def fit_poisoned(module, tmp_path):
    import lightning as L

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(8)]
    trainer = L.Trainer(max_steps=8, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_non_finite_loss_is_skipped_and_counted(tmp_path):
    m = Poisoned.make(nan_loss=(2, 5))
    fit_poisoned(m, tmp_path)
    assert m.skipped_steps == 2
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    frozen = Poisoned.make(nan_loss=range(8), max_skipped=100)
    before = [p.detach().clone() for p in frozen.parameters()]
    fit_poisoned(frozen, tmp_path)
    assert frozen.skipped_steps == 8  # every update skipped: the weights never moved
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, frozen.parameters()))


def test_non_finite_gradients_are_skipped_not_applied(tmp_path):
    m = Poisoned.make()
    before = m.lin.weight.detach().clone()
    m.lin.weight.register_hook(lambda g: g * float("inf"))  # every gradient is infinite
    m.max_skipped_steps = 100
    fit_poisoned(m, tmp_path)
    assert m.skipped_steps == 8
    assert torch.equal(m.lin.weight.detach(), before)  # never updated with a broken gradient


def test_a_diverged_run_stops_with_one_clear_error(tmp_path):
    m = Poisoned.make(nan_loss=range(8), max_skipped=3)
    with pytest.raises(UserError, match="max_skipped_steps=3"):
        fit_poisoned(m, tmp_path)


def test_lr_scale_multiplies_the_named_parameters_and_a_name_that_matches_nothing_is_an_error():
    from torch import nn

    from data.runtime import adamw_with_schedule
    from fusion.train import lr_scales

    net = nn.ModuleDict({"embed": nn.Embedding(5, 4), "body": nn.Linear(4, 4), "head": nn.Linear(4, 5)})
    o = {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0}
    _, config = adamw_with_schedule(net.named_parameters(), o, max_steps=8, lr_scale={"embed": 10.0, "head": 0.5})
    lrs = {id(p): g["lr"] for g in config["optimizer"].param_groups for p in g["params"]}
    assert lrs[id(net["embed"].weight)] == pytest.approx(1e-2)
    assert lrs[id(net["body"].weight)] == pytest.approx(1e-3)
    assert lrs[id(net["head"].weight)] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="names no parameter"):
        adamw_with_schedule(net.named_parameters(), o, max_steps=8, lr_scale={"embeddings": 10.0})
    # the config's two knobs name the decoder's tables (the 2-D ones only when they exist; a tied head is the table)
    from omegaconf import OmegaConf

    t = OmegaConf.create({"embed_lr_scale": 10, "head_lr_scale": 1})
    assert lr_scales(t, {"image_pos_embed": True}) == {"decoder.lm.model.embed_tokens": 10.0,
                                                       "decoder.image_rows": 10.0, "decoder.image_cols": 10.0}
    assert lr_scales(t, {"image_pos_embed": False}) == {"decoder.lm.model.embed_tokens": 10.0}
    with pytest.raises(Exception, match="tied embeddings"):
        lr_scales(t, {"tie_embeddings": True})


def test_batched_muon_takes_torch_muons_steps_and_shares_its_checkpoints():
    """BatchedMuon runs torch.optim.Muon's update for all same-shape matrices at once: the same parameters
    after several steps (square, wide and tall matrices, weight decay, both LR adjustments), and each one's
    state loads into the other."""
    from data.runtime import _batched_muon

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (16, 16), (40, 16), (16, 40), (40, 16), (8, 24)]
    for adjust in ("match_rms_adamw", "original"):
        ref = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
        ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
        opt_ours = _batched_muon()(ours, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
        start = [p.detach().clone() for p in ref]
        for _ in range(3):
            grads = [torch.randn(s, generator=g) for s in shapes]
            for a, b, gr in zip(ref, ours, grads):
                a.grad, b.grad = gr.clone(), gr.clone()
            opt_ref.step()
            opt_ours.step()
        for a, b, s in zip(ref, ours, start):
            assert (a - s).abs().max() > 1e-3  # it moved
            # fp32 batched against one-by-one matmuls: the summation order differs by CPU (7.8e-6 seen on an
            # AMD EPYC with AVX-512 BF16), against updates of ~1e-2
            torch.testing.assert_close(b, a, rtol=0, atol=5e-5)
        again = torch.optim.Muon(ours, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
        again.load_state_dict(opt_ours.state_dict())
        for a, b in zip(opt_ours.state.values(), again.state.values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_hydra_writes_its_log_in_the_run_dir_when_one_is_given(tmp_path):
    """With run_dir=DIR the command's log and .hydra/ land in DIR, nothing in the cwd; without it, in a dated
    folder under the cwd's runs/ (a bad tokenizer_dir: the process stops early, after Hydra has set up its folder)."""
    from tests.conftest import ROOT, run_module

    env = {"PYTHONPATH": str(ROOT)}
    proc = run_module("tokenizer.evaluate", "tokenizer_dir=/nonexistent", f"run_dir={tmp_path / 'run'}",
                      cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and "no tokenizer at /nonexistent" in proc.stderr
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file() and (tmp_path / "run" / "evaluate.log").is_file()
    assert not (tmp_path / "runs").exists()
    proc = run_module("tokenizer.evaluate", "tokenizer_dir=/nonexistent", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    dated = list((tmp_path / "runs" / "tokenizer_eval").iterdir())
    assert len(dated) == 1 and (dated[0] / ".hydra").is_dir()


def test_write_json_and_jsonl_are_whole_or_nothing(tmp_path, monkeypatch):
    """Both writers go through a temporary file and a rename: the lines read back as written, and a write that
    fails before the rename leaves the previous file as it was."""
    import json

    from data.runtime import write_json, write_jsonl

    rows = [{"q": "What colour is the square?", "a": "red"}, {"q": "How many?", "a": 3}]
    out = tmp_path / "sub" / "answers.jsonl"
    write_jsonl(out, rows)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    summary = tmp_path / "evaluation.json"
    write_json(summary, {"vqa": 0.9})

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    for path, write, new in ((out, write_jsonl, [{"q": "other"}]), (summary, write_json, {"vqa": 0.1})):
        before = path.read_text()
        with pytest.raises(OSError, match="disk full"):
            write(path, new)
        assert path.read_text() == before
    monkeypatch.undo()
    assert json.loads(summary.read_text()) == {"vqa": 0.9}
