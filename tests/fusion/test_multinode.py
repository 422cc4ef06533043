"""Two real processes as two nodes (NODE_RANK 0 and 1, gloo on 127.0.0.1): lockstep weights, disjoint
samples, uneven shards that do not hang, for the decoder and for the tokenizer's EMA codebook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_TOKENIZER, run_module, run_two_nodes

MULTINODE = ["trainer=multinode", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
             "trainer.ddp_timeout_s=60", "trainer.precision=32-true", "audit=true"]


@pytest.fixture(scope="module")
def uneven_codes(tiny_tokenizer, tmp_path_factory) -> Path:
    """Code shards of 100, 100, 100 and 30 samples: the two ranks get 200 and 130."""
    root = tmp_path_factory.mktemp("uneven")
    run_module("data.build", f"data.root={root / 'shapes'}", "data.splits.train=330", "data.splits.val=40",
               "data.splits.test=0", "data.splits.holdout=0", "data.shard_size=100", "workers=1")
    out = root / "codes"
    run_module("tokenizer.pretokenize", f"tokenizer_dir={tiny_tokenizer / 'tokenizer'}", f"data.root={root / 'shapes'}",
               f"out={out}", "splits=[train,val]", "workers=1")
    return out


def audit(run: Path) -> tuple[list[set], list[str], list[int]]:
    keys, shas, steps = [], [], []
    for r in (0, 1):
        rows = [json.loads(line) for line in (run / "audit" / f"samples_rank{r}.jsonl").read_text().splitlines()]
        keys.append({k for row in rows for k in row["keys"]})
        w = json.loads((run / "audit" / f"weights_rank{r}.json").read_text())
        shas.append(w["sha256"])
        steps.append(w["step"])
        assert w["world_size"] == 2
    return keys, shas, steps


@pytest.mark.slow
def test_two_node_decoder_training(uneven_codes, tmp_path):
    run = tmp_path / "run"
    run_two_nodes("fusion.train", f"codes={uneven_codes}", f"run_dir={run}", *MULTINODE, "model=test",
                  "seq_len=256", "train.batch_size=4", "text.train_samples=200", "text.vocab_size=300",
                  "trainer.max_steps=45", "trainer.val_check_interval=20", "trainer.limit_val_batches=2",
                  "samples.count=1")
    keys, shas, steps = audit(run)
    assert steps == [45, 45]
    assert shas[0] == shas[1], "the ranks' weights differ after training"
    assert keys[0] and keys[1] and not (keys[0] & keys[1]), "the two ranks read the same samples"
    assert (run / "model" / "decoder.safetensors").is_file()


@pytest.mark.slow
def test_two_node_tokenizer_keeps_one_codebook(uneven_codes, tmp_path):
    shapes = uneven_codes.parent / "shapes"
    run = tmp_path / "tok"
    run_two_nodes("tokenizer.train", f"data.root={shapes}", f"run_dir={run}", *MULTINODE,
                  *[a for a in TINY_TOKENIZER if not a.startswith("trainer.max_steps")], "trainer.max_steps=30",
                  "train.time_budget_min=null")
    keys, shas, steps = audit(run)
    assert steps == [30, 30] and shas[0] == shas[1], "codebooks or weights diverged across ranks"
    assert not (keys[0] & keys[1])
    cfg = (run / "config.yaml").read_text()
    assert "sync_codebook: true" in cfg
