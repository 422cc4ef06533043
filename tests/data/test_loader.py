"""Training loaders: balanced disjoint shard plans, skip counts from workers, stream positions on resume."""

from __future__ import annotations

import pytest
import torch

from data.loader import DecodedCache, EpochLoader, ImageTransform, ShardPlan, count_samples, image_stages, in_order, train_loader
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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_clocked_stream_knows_the_global_step_of_its_batches(uneven_shards, workers):
    """Each stream's StreamClock says which training step its k-th batch will be (so the data can follow a schedule
    in steps: fusion's task phases), across epochs; with workers the DataLoader takes their batches in turn, exact
    until the first worker runs out at the epoch's end."""

    def stages(seed, clock):
        def stamp(batches):
            for k, b in enumerate(batches):
                yield {**b, "clock": (clock.step(k), clock.epoch)} if "keys" in b else b
        return [*image_stages(8, ImageTransform(48), seed=seed, partial=False), stamp]

    loader = train_loader(str(uneven_shards), stages, workers, clocked=True)
    seen = []
    for epoch in range(2):
        stamps = [b["clock"] for b in loader]
        exact = len(stamps) - (max(1, workers) - 1)  # the last turn may be short of a worker
        assert [s for s, _ in stamps[:exact]] == list(range(len(seen), len(seen) + exact))
        assert {e for _, e in stamps} == {epoch}
        seen += stamps


@pytest.mark.parametrize("budget_mb", [64, 0.05])
def test_decoded_cache_gives_the_same_batches_and_counts_every_epoch(tmp_path, uneven_shards, budget_mb):
    """The tokenizer's in-memory cache of decoded shards: three epochs give the batches (keys, random crops, skip
    counts) of reading from disk; shards past the budget are read from disk; the shards it holds are not re-read."""
    import shutil

    for p in sorted(uneven_shards.glob("*.tar"))[:3]:
        shutil.copy(p, tmp_path / p.name)
    write_bad_shard(tmp_path / "00003.tar")  # skip markers must be replayed from the cache too
    write_truncated_shard(tmp_path / "00004.tar", n=10)

    def loader(cache):
        tf = ImageTransform(48, 24, crop_step=4, crop_tries=4)
        return train_loader(str(tmp_path), lambda seed: image_stages(8, tf, seed=seed, partial=False, cache=cache), 0)

    def epochs(data):
        return [[(b["keys"], b["images"], b["stats"]) for b in data] for _ in range(3)]

    cache = DecodedCache(budget_mb)
    plain, cached = epochs(loader(None)), epochs(loader(cache))
    for e, (a, b) in enumerate(zip(plain, cached)):
        assert [k for k, _, _ in a] == [k for k, _, _ in b], f"epoch {e}"
        assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a, b))
        assert [st for _, _, st in a] == [st for _, _, st in b]
    assert sum(sum(st["skipped"].values()) for _, _, st in cached[2]) >= 9
    assert cache.used <= cache.max_bytes
    if budget_mb == 64:
        assert len(cache.shards) == 5  # every shard, the broken ones with their markers
        for p in tmp_path.glob("*.tar"):
            p.write_bytes(b"gone")  # from now on reading the disk would only give skip markers
        assert [[k for k, _, _ in e] for e in epochs(loader(cache))] == [[k for k, _, _ in e] for e in plain]
    else:
        assert len(cache.shards) < 5  # the budget holds one or two shards of 30 decoded 48 px images
