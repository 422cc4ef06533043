"""Every model preset builds on the meta device, and the printed figures are the real module's."""

from __future__ import annotations

import pytest

from fusion.presets import describe, main, presets


def test_all_presets_are_listed_smallest_first():
    names = presets()
    assert names[:2] == ["test", "tiny"] and names[-2:] == ["1b", "7b"]


@pytest.mark.parametrize("name", ["tiny", "1b", "7b"])
def test_preset_builds_on_meta_and_counts_match_the_config(name):
    d = describe(name, vocab_size=65536 + 8192 + 8, seq_len=4096)
    emb = 2 * (65536 + 8192 + 8) * d["hidden"]  # untied input and output embeddings
    norms = (2 * d["layers"] + 1) * d["hidden"] + 2 * d["layers"] * (d["hidden"] // d["heads"])  # + QK-norm
    assert d["params"] == d["non_embedding_params"] + emb + norms
    assert d["train_flops_per_token"] > 6 * d["non_embedding_params"]
    assert d["train_memory_gib"] == pytest.approx(d["params"] * 16 / 2**30)


def test_scale_presets_reach_1b_and_7b():
    assert 1.0e9 < describe("1b", 73736, 4096)["non_embedding_params"] < 1.5e9
    assert 6.0e9 < describe("7b", 73736, 4096)["non_embedding_params"] < 7.0e9


def test_command_prints_one_row_per_preset(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in presets():
        assert any(line.startswith(name) for line in out.splitlines()), name
