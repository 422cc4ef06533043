"""Training loaders: balanced disjoint shard plans, skip counts from workers, stream positions on resume."""

from __future__ import annotations

import pytest
import torch

from data.loader import EpochLoader, ImageTransform, ShardPlan, count_samples, image_stages, in_order, train_loader
from data.shapes import WorldConfig, make_sample
from data.shards import ShardError, ShardWriter
from tests.data.badinputs import write_bad_shard, write_truncated_shard


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Shards of 30, 30, 30 and 13 samples."""
    root = tmp_path_factory.mktemp("uneven")
    with ShardWriter(str(root), shard_size=30) as w:
        for i in range(103):
            w.write(make_sample(WorldConfig(), "train", i))
    return root


def test_count_samples_reads_headers_only(uneven_shards, tmp_path):
    assert [count_samples(str(p)) for p in sorted(uneven_shards.glob("*.tar"))] == [30, 30, 30, 13]
    write_truncated_shard(tmp_path / "cut.tar", n=10)
    assert 3 <= count_samples(str(tmp_path / "cut.tar")) < 10


def test_plan_gives_every_shard_to_exactly_one_slot_and_balances():
    urls = [f"{i}.tar" for i in range(7)]
    counts = [100, 100, 100, 100, 100, 100, 40]
    plan = ShardPlan(urls, world_size=2, num_workers=2, counts=counts)
    flat = [u for rank in plan.slots for worker in rank for u in worker]
    assert sorted(flat) == sorted(urls)
    per_rank = [sum(row) for row in plan.samples]
    assert abs(per_rank[0] - per_rank[1]) <= 100
    with pytest.raises(ShardError, match="ranks"):
        ShardPlan(["a.tar"], world_size=2, num_workers=1, counts=[10])


def _loader(pattern, workers, steps=None, batch=8):
    return train_loader(str(pattern), lambda seed: image_stages(batch, ImageTransform(48), seed=seed, partial=False),
                        workers, steps=steps)


def test_training_data_smaller_than_one_batch_stops_in_one_line_instead_of_spinning(uneven_shards):
    from data.runtime import UserError

    with pytest.raises(UserError, match=r"no full batch: \d+ samples .* lower the batch size or add training data"):
        next(iter(_loader(uneven_shards, 0, batch=1000)))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_reads_each_sample_at_most_once(uneven_shards, workers):
    loader = _loader(uneven_shards, workers)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) and len(keys) >= 103 - 8 * max(1, workers)
    second = [k for b in loader for k in b["keys"]]
    assert set(second) <= {f"{s:05d}{i:04d}" for s in range(4) for i in range(30)}
    assert second != keys  # each epoch is shuffled anew


def test_resume_continues_the_epoch_without_repeats(uneven_shards):
    step = {"n": 0}
    full = _loader(uneven_shards, 0, steps=lambda: step["n"])
    reference = [b["keys"] for b in full]
    # a run that trained 5 batches and saved its loader state, resumed in a fresh loader
    state = {"epoch": 0, "epoch_start": 0}
    step["n"] = 5
    resumed = _loader(uneven_shards, 0, steps=lambda: step["n"])
    resumed.load_state_dict(state)
    rest = [b["keys"] for b in resumed]
    assert rest == reference[5:]


def test_bad_samples_inside_training_batches_are_counted(tmp_path):
    write_bad_shard(tmp_path / "00000.tar")
    write_truncated_shard(tmp_path / "00001.tar", n=10)
    batches = list(_loader(tmp_path, workers=1, batch=2))
    skipped = sum(sum(b["stats"]["skipped"].values()) for b in batches)
    assert skipped >= 9  # counted in a DataLoader worker, reported in the main process
    assert all(b["images"].shape[1:] == (3, 48, 48) and b["images"].dtype == torch.uint8 for b in batches)


def test_validation_reads_everything_in_order(uneven_shards):
    keys = [k for b in in_order(str(uneven_shards), image_stages(16, ImageTransform(48), shuffle_buffer=0)) for k in b["keys"]]
    assert keys == sorted(keys) and len(keys) == 103
