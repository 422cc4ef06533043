"""Webdataset pipelines for training: shards split across nodes and workers, decoded, batched.

Skipped samples are counted where they are met (often inside a DataLoader worker) and the counts
ride along with the next batch (`batch["stats"]`), so the training process can report them.
"""

from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data.runtime import UserError
from data.shards import DecodePolicy, ReadStats, ShardError, decoded_samples, expand_shards, tar_samples


@dataclass
class ImageTransform:
    """Resize the shorter side to `resolution`, centre-crop square; optionally a random `crop` after."""

    resolution: int
    crop: int | None = None
    crop_step: int = 1  # crop offsets are multiples of this (a patch tokenizer's patch size keeps its grid)
    crop_tries: int = 1  # draw this many crops and keep the busiest (largest pixel variance): fewer flat crops

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        r = self.resolution
        if img.size != (r, r):
            w, h = img.size
            s = r / min(w, h)
            img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
            w, h = img.size
            left, top = (w - r) // 2, (h - r) // 2
            img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.crop and self.crop < r:
            rng = rng or random
            n, best = (r - self.crop) // self.crop_step + 1, None
            for _ in range(max(1, self.crop_tries)):
                top, left = self.crop_step * rng.randrange(n), self.crop_step * rng.randrange(n)
                c = x[:, top:top + self.crop, left:left + self.crop]
                busy = float(c.float().var(dim=(1, 2)).sum()) if self.crop_tries > 1 else 0.0
                if best is None or busy > best[0]:
                    best = (busy, c)
            x = best[1]
        return x


def batches_with_stats(stream: Iterable[dict], batch_size: int, to_item: Callable[[dict], dict],
                       partial: bool = True) -> Iterator[dict]:
    """Stage: samples and markers -> batches {field: stacked or list, "stats": ReadStats json}.

    A decoded sample (it has "notes") counts as read; so does a {"__read__": notes} marker, which a
    stage that turns samples into other items (e.g. packed sequences) leaves for each sample it used.
    """
    stats, items = ReadStats(), []
    for s in stream:
        if "__shard_done__" in s:
            stats.shards += 1
            continue
        if "__skip__" in s:
            stats.skipped[s["__skip__"]] += 1
            continue
        if "__read__" in s or "notes" in s:
            stats.read += 1
            stats.normalised.update(s.get("__read__") or s.get("notes") or {})
            if "__read__" in s:
                continue
        items.append(to_item(s))
        if len(items) == batch_size:
            yield collate(items, stats)
            stats, items = ReadStats(), []
    if items and partial:
        yield collate(items, stats)
    elif stats.read or stats.skipped or stats.shards:  # counts after the last full batch still get reported
        yield {"stats": stats.to_json(), STATS_ONLY: True}


STATS_ONLY = "__stats_only__"


def collate(items: list[dict], stats: ReadStats) -> dict:
    out: dict = {"stats": stats.to_json()}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def shuffled(stream: Iterable[dict], buffer: int, seed: int) -> Iterator[dict]:
    """A sample-level shuffle buffer that passes markers straight through."""
    rng = random.Random(seed)
    buf: list[dict] = []
    for s in stream:
        if "__skip__" in s or "__shard_done__" in s:
            yield s
            continue
        if len(buf) < buffer:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


class DecodedCache:
    """Whole shards' decoded samples kept in memory from one epoch to the next, up to `max_mb`.

    Reading a shard and decoding its images costs the tokenizer's loader ~15 ms of a ~33 ms batch (48 px shapes, one
    process): every epoch after the first reads cached shards instead. A shard is kept only when read to its end and
    when it fits what is left of the budget (past it, later shards are read from disk as before). The stream is the
    same, skip and end-of-shard markers included, so a run gives the same batches with or without the cache. Useful
    only in the training process itself (num_workers 0): a worker's cache would end with its epoch.
    """

    def __init__(self, max_mb: float):
        self.max_bytes, self.used = int(max_mb * 2**20), 0
        self.shards: dict[str, list[dict]] = {}

    @staticmethod
    def sample_bytes(s: dict) -> int:
        img = s.get("image")
        pixels = img.width * img.height * len(img.getbands()) if img is not None else 0
        return pixels + len(s.get("caption") or "") + 64 * len(s.get("meta") or {}) + 512  # + dict and object overhead

    def stage(self, policy: DecodePolicy) -> Callable[[Iterable[dict]], Iterator[dict]]:
        """Stage: {url} -> decoded samples and markers, as tar_samples then decoded_samples would give them."""
        def run(urls: Iterable[dict]) -> Iterator[dict]:
            for src in urls:
                hit = self.shards.get(src["url"])
                if hit is not None:
                    yield from (dict(s) for s in hit)  # copies: a later stage may add keys to what it is given
                    continue
                kept, size = [], 0
                for s in decoded_samples(tar_samples([src]), policy):
                    kept.append(s)
                    size += self.sample_bytes(s) if "image" in s else 64
                    yield dict(s)
                if self.used + size <= self.max_bytes:
                    self.shards[src["url"]], self.used = kept, self.used + size
        return run


def image_stages(batch_size: int, transform: ImageTransform, *, policy: DecodePolicy | None = None,
                 shuffle_buffer: int = 1000, seed: int | str = 0, partial: bool = True,
                 item: Callable[[dict, ImageTransform, random.Random], dict] | None = None,
                 cache: DecodedCache | None = None) -> list:
    """Stages from shard URLs to batches of {"images": uint8 [b, 3, H, W], "keys": [...], "stats": {...}}
    (or of whatever `item` makes of a decoded sample). cache: keep decoded shards in memory across epochs."""
    policy = policy or DecodePolicy(draft_size=transform.resolution * 2)
    rng = random.Random(seed)

    def to_item(s):
        if item is not None:
            return item(s, transform, rng)
        return {"images": transform(s["image"], rng), "keys": s["key"]}

    read = [cache.stage(policy)] if cache is not None else [tar_samples, lambda src: decoded_samples(src, policy)]
    return [
        *read,
        (lambda src: shuffled(src, shuffle_buffer, seed)) if shuffle_buffer else (lambda src: src),
        lambda src: batches_with_stats(src, batch_size, to_item, partial=partial),
    ]


def in_order(pattern: str, stages: list) -> wds.DataPipeline:
    """Every shard, in order, in this process: validation and evaluation (each rank reads all of it)."""
    return wds.DataPipeline(wds.SimpleShardList(expand_shards(pattern)), *stages,
                            lambda src: (b for b in src if STATS_ONLY not in b))


@dataclass(frozen=True)
class StreamClock:
    """Where one (rank, worker) stream's batches fall in training: the DataLoader takes its workers'
    batches in turn, so this stream's k-th batch of the epoch is global step first_step + k * workers + worker.
    Deterministic (a resumed run replays the epoch from its start), so the data can follow a schedule in steps."""

    epoch: int = 0
    first_step: int = 0
    worker: int = 0
    workers: int = 1

    def step(self, batches_done: int) -> int:
        return self.first_step + batches_done * self.workers + self.worker


def train_loader(pattern: str, make_stages: Callable[..., list], num_workers: int, steps=None,
                 clocked: bool = False) -> "EpochLoader":
    """The training loader over `pattern`: make_stages(seed) builds the stages after the shard URLs; its
    seed differs per epoch, rank and worker so every epoch is shuffled anew. clocked: make_stages(seed, clock)
    also gets the stream's StreamClock (a schedule over training steps, e.g. fusion's task phases)."""
    urls = expand_shards(pattern)

    def make_stream(urls, epoch, r, w, first_step=0):
        seed = f"{epoch}/{r}/{w}"
        stages = make_stages(seed, StreamClock(epoch, first_step, w, max(1, num_workers))) if clocked else make_stages(seed)
        return wds.DataPipeline(wds.SimpleShardList(urls), *stages)

    return EpochLoader(urls, make_stream, num_workers, steps=steps)


# ---------------------------------------------------------------- distributed, resumable epochs

def count_samples(url: str) -> int:
    """Samples (distinct keys) in a shard, from its tar headers alone; a cut-off tar counts what precedes the cut."""
    keys, last = 0, None
    try:
        with tarfile.open(url, "r:") as t:
            for m in t:
                if not m.isfile() or "." not in m.name.rsplit("/", 1)[-1]:
                    continue
                key = m.name.split(".", 1)[0]
                if key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


class ShardPlan:
    """Which shards each (rank, worker) reads: every shard exactly once per epoch across the whole job.

    Shards go, largest first, to the least-loaded rank (an epoch ends when the first rank runs out, so
    rank totals matter most), then to that rank's least-loaded worker. The assignment is fixed; what
    changes each epoch is the order of shards within a slot and the sample shuffle.
    """

    def __init__(self, urls: list[str], world_size: int, num_workers: int, counts: list[int] | None = None):
        counts = counts if counts is not None else [count_samples(u) for u in urls]
        slots = max(1, num_workers)
        self.samples = [[0] * slots for _ in range(world_size)]
        self.slots: list[list[list[str]]] = [[[] for _ in range(slots)] for _ in range(world_size)]
        for n, u in sorted(zip(counts, urls), key=lambda nu: (-nu[0], nu[1])):
            r = min(range(world_size), key=lambda r: (sum(self.samples[r]), r))
            w = min(range(slots), key=lambda w: (self.samples[r][w], w))
            self.slots[r][w].append(u)
            self.samples[r][w] += n
        empty = [r for r in range(world_size) if not any(self.slots[r])]
        if empty:
            raise ShardError(f"{len(urls)} shards cannot give each of {world_size} ranks one: ranks {empty} get none")


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: ShardPlan, make_stream, rank: int, epoch: int, first_step: int = 0):
        self.plan, self.make_stream, self.rank, self.epoch, self.first_step = plan, make_stream, rank, epoch, first_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        urls = list(self.plan.slots[self.rank][w])
        random.Random(f"{self.epoch}/{self.rank}/{w}").shuffle(urls)
        yield from self.make_stream(urls, self.epoch, self.rank, w, self.first_step)


def _all_ranks_have(have: bool) -> bool:
    """True only if every rank still has a batch: an epoch ends for all ranks when the first runs out."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return have
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(have)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class EpochLoader:
    """The training loader: each rank reads its own shards (disjoint samples), every rank yields the
    same number of batches (the epoch ends on all ranks when the first runs out), and a resumed run
    continues the epoch where its checkpoint left it (`state_dict`, saved by Lightning).

    make_stream(urls, epoch, rank, worker, first_step) -> iterator of full batches from those shards.
    `steps` reports the batches actually trained (Lightning prefetches one ahead), e.g. the global step.
    Resuming re-reads the epoch's batches up to that point and drops them: exact, and cheap at the
    scale of one epoch of local shards. Rank and world size are read when iteration starts (the
    process group exists by then; RANK/WORLD_SIZE are not needed in the workers, which get their
    shard lists from here).
    """

    def __init__(self, urls: list[str], make_stream, num_workers: int, steps=None):
        self.urls, self.make_stream, self.num_workers = urls, make_stream, num_workers
        self.plan: ShardPlan | None = None
        self.rank = 0
        self._yielded = 0
        self.steps = steps or (lambda: self._yielded)
        self.epoch, self.epoch_start = -1, 0
        self._resume = False

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_start": self.epoch_start}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epoch_start, self._resume = int(state["epoch"]), int(state["epoch_start"]), True

    def _setup(self):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if world > 1 else 0
        if self.plan is None or len(self.plan.slots) != world:
            self.plan = ShardPlan(self.urls, world, self.num_workers)

    def __iter__(self):
        self._setup()
        if self._resume:  # continue the saved epoch
            skip, self._resume = self.steps() - self.epoch_start, False
        else:
            self.epoch, self.epoch_start, skip = self.epoch + 1, self.steps(), 0
        data = _EpochDataset(self.plan, self.make_stream, self.rank, self.epoch, self.epoch_start)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=4 if self.num_workers else None)
        it = self._batches(iter(loader))
        for _ in range(skip):
            next(it, None)
        yielded = 0
        while True:
            batch = next(it, None)
            if not _all_ranks_have(batch is not None):
                if yielded == 0 and skip == 0:  # else every later epoch is empty too: training would spin forever
                    samples = [sum(r) for r in self.plan.samples]
                    raise UserError(f"an epoch of the training shards gives no full batch: {min(samples)} samples on "
                                    f"the smallest of {len(samples)} rank(s), fewer than one batch after filtering "
                                    "and packing; lower the batch size or add training data")
                return
            self._yielded += 1
            yielded += 1
            yield batch

    def _batches(self, it):
        """Batches, with the counts of stats-only records (a worker's tail) merged into the next one."""
        pending = ReadStats()
        for b in it:
            if STATS_ONLY in b:
                pending.merge(b["stats"])
                continue
            if pending.read or pending.skipped or pending.shards:
                b["stats"] = pending.merge(b["stats"]).to_json()
                pending = ReadStats()
            yield b


def make_loader(pipeline: wds.DataPipeline, num_workers: int = 0) -> wds.WebLoader:
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
