"""Code shards -> documents -> packed sequences -> batches, as a webdataset pipeline.

Bad samples (unreadable codes, codes from another grid, broken captions) are skipped and counted
like bad images are, and the counts ride along with each batch.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from typing import Iterable, Iterator

import numpy as np

from data.loader import ImageTransform, StreamClock, batches_with_stats, shuffled
from data.shards import (DecodePolicy, ReadStats, Skip, account, decode_caption, decode_meta, decoded_samples,
                         expand_shards, tar_samples)
from fusion.documents import TaskMix, make_document
from fusion.sequences import Packer, tokenize
from fusion.vocab import MultimodalVocab


def decode_codes(raw: dict, grid: int, num_codes: int, policy: DecodePolicy) -> dict:
    """A raw code-shard sample -> {key, codes [g, g], caption, meta, notes}, or Skip."""
    data = raw.get("codes.npy")
    if data is None:
        raise Skip("codes_missing")
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise Skip("codes_unreadable")
    if codes.shape != (grid, grid):
        raise Skip("codes_wrong_grid")
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        raise Skip("codes_out_of_range")
    notes: Counter = Counter()
    return {"key": raw["__key__"], "codes": codes.astype(np.int64), "caption": decode_caption(raw.get("txt"), policy, notes),
            "meta": decode_meta(raw.get("json"), notes), "notes": notes}


def code_samples(raws: Iterable[dict], grid: int, num_codes: int, policy: DecodePolicy) -> Iterator[dict]:
    """Stage: raw samples -> decoded code samples, or skip markers."""
    for raw in raws:
        if "__skip__" in raw or "__shard_done__" in raw:
            yield raw
            continue
        try:
            yield decode_codes(raw, grid, num_codes, policy)
        except Skip as s:
            yield {"__skip__": s.reason, "__key__": raw["__key__"]}


WRITING_TASKS = ("t2i", "interleave")


def packed_sequences(samples: Iterable[dict], vocab: MultimodalVocab, seq_len: int, mix: TaskMix, seed: int,
                     pixels: ImageTransform | None = None, placeholders: int = 0, clock: StreamClock | None = None,
                     batch_size: int = 1) -> Iterator[dict]:
    """Stage: samples -> {"packed": Packed}; each consumed sample leaves a {"__read__"} marker.

    Early fusion: samples carry codes. The adapter (`pixels` set): samples carry images, which become
    placeholder spans; it cannot write images, so its writing documents are dropped. Tasks are drawn
    from the same random stream either way, so both arms get the same reading documents in the same order.
    With the training stream's `clock` (and its batch size) the mix follows its phases over training steps and
    the curriculum holds in the first epoch only (not again in every epoch), a phase's curriculum window in its
    steps; without one (validation) the first mix throughout.
    """
    rng = random.Random(seed)
    packer = Packer(seq_len, vocab.pad)
    documents, sequences = 0, 0
    curriculum = clock is None or clock.epoch == 0
    for s in samples:
        if "__skip__" in s or "__shard_done__" in s:
            yield s
            continue
        step = clock.step(sequences // batch_size) if clock is not None else 0
        if (curriculum and not mix.in_curriculum(s["meta"], documents)) or (
                clock is not None and not mix.in_window(s["meta"], step)):
            yield {"__read__": s["notes"]}
            continue
        qa = s["meta"].get("qa") or []
        task = mix.pick(rng, has_qa=bool(qa), has_scene=bool(s["meta"].get("scene")), step=step)
        yield {"__read__": s["notes"]}
        if task is None:  # nothing this phase's mix can make of it
            continue
        documents += 1
        if task in ("caption", "text") and not s["caption"]:
            task = "t2i"  # nothing to learn to say; it can still be drawn unconditionally
        image = s["codes"] if pixels is None else pixels(s["image"])
        doc = make_document(task, image, s["caption"], qa, rng, mix, s["meta"])
        if pixels is not None and task in WRITING_TASKS:
            continue
        for p in packer.add(tokenize(vocab, doc, placeholders=placeholders, key=s["key"])):
            sequences += 1
            yield {"packed": p}
    for p in packer.flush():
        yield {"packed": p}


def sequence_stages(vocab: MultimodalVocab, seq_len: int, batch_size: int, mix: TaskMix, *, seed: int | str = 0,
                    shuffle_buffer: int = 1000, partial: bool = True, pixels: ImageTransform | None = None,
                    placeholders: int = 0, clock: StreamClock | None = None) -> list:
    """Stages from shard URLs to batches of {"input_ids", "labels", "position_ids", "modality", "read_span": [b, seq_len],
    "keys", "stats"}.

    Code shards by default; with `pixels` (the adapter baseline) image shards, and each batch also
    holds "images": per sequence, the list of its images' pixels in reading order.
    """
    if pixels is None:
        decode = lambda src: code_samples(src, vocab.layout.grid, vocab.num_codes, DecodePolicy(require_image=False))
    else:
        decode = lambda src: decoded_samples(src, DecodePolicy(draft_size=pixels.resolution * 2))

    def to_item(s):
        item = {**s["packed"].as_tensors(), "keys": s["packed"].keys}
        return {**item, "images": s["packed"].images} if pixels is not None else item

    return [
        tar_samples,
        decode,
        (lambda src: shuffled(src, shuffle_buffer, seed)) if shuffle_buffer else (lambda src: src),
        lambda src: packed_sequences(src, vocab, seq_len, mix, seed, pixels, placeholders, clock, batch_size),
        lambda src: batches_with_stats(src, batch_size, to_item, partial=partial),
    ]


def iter_code_samples(pattern: str, grid: int, num_codes: int, stats: ReadStats | None = None) -> Iterator[dict]:
    """Code samples read in this process, in shard order (evaluation, vocabulary building)."""
    stats = stats if stats is not None else ReadStats()
    raws = tar_samples({"url": u} for u in expand_shards(pattern))
    yield from account(code_samples(raws, grid, num_codes, DecodePolicy(require_image=False)), stats)
