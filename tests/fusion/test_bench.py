"""The speed benchmark times the step fusion.train takes, in parts."""

from __future__ import annotations

import pytest

from fusion.bench import train_speed


@pytest.mark.parametrize("optimizer,compile", [("muon", False), ("adamw", False)])  # compiling: test_decoder.py
def test_train_speed_times_forward_backward_and_optimizer(optimizer, compile):
    peaks = {"fp32": 100.0, "bf16": 100.0}
    r = train_speed("test", 300, 64, 2, "32-true", 1, peaks, optimizer=optimizer, compile=compile)
    assert r["optimizer"] == optimizer and r["compiled"] == compile
    assert all(r["ms"][k] > 0 for k in ("forward", "backward", "optimizer")) and r["tokens_per_s"] > 0
    assert r["step_s_median"] == pytest.approx(sum(r["ms"].values()) / 1e3, abs=2e-3)
