"""Run plumbing: atomic checkpoints, safe loading, resume checks, precision choice, FSDP on CPU."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from data.runtime import (UserError, _atomic_checkpoint_io, load_checkpoint_safely, make_strategy, resolve_precision,
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


def test_schedule_warms_up_then_decays():
    assert warmup_cosine(0, 10, 0.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(50, 10, 0.5, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(99, 10, 1.0, 0.1) == pytest.approx(0.1)
