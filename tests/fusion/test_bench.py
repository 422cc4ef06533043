"""The speed benchmark times the step fusion.train takes, in parts."""

from __future__ import annotations

import pytest

from fusion.bench import attention_replaced_by_values, attention_share, train_speed


@pytest.mark.parametrize("optimizer,compile", [("muon", False), ("adamw", False)])  # compiling: test_decoder.py
def test_train_speed_times_forward_backward_and_optimizer(optimizer, compile):
    peaks = {"fp32": 100.0, "bf16": 400.0}
    r = train_speed("test", 300, 64, 2, "32-true", 1, peaks, optimizer=optimizer, compile=compile)
    assert r["peak_gflops"] == 100.0  # the row keeps the peak of its own precision, which its MFU divides by
    assert r["mfu"] == pytest.approx(r["gflops_per_s"] / 100.0, abs=2e-3)
    assert r["optimizer"] == optimizer and r["compiled"] == compile
    assert all(r["ms"][k] > 0 for k in ("forward", "backward", "optimizer")) and r["tokens_per_s"] > 0
    assert r["step_s_median"] == pytest.approx(sum(r["ms"].values()) / 1e3, abs=2e-3)


def test_attention_share_times_the_step_without_attention_and_puts_it_back():
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fusion.decoder import Decoder
    from fusion.presets import preset

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]
    dec = Decoder(preset("test", 64), 300).eval()
    ids = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        before = dec(input_ids=ids).logits
        with attention_replaced_by_values():
            without = dec(input_ids=ids).logits
        after = dec(input_ids=ids).logits
    assert not torch.allclose(before, without) and torch.equal(before, after)  # swapped inside, restored after
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is real
    r = attention_share("test", 300, 64, 2, "32-true", rounds=1, doc_len=16)
    assert r["forward_backward_ms"] > 0 and r["without_attention_ms"] > 0 and r["attention_share"] < 1
