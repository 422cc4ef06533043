"""The caption information gain measures what the caption is worth to the image: clearly positive for a
model trained where the caption fixes the image, ~0 for the same model trained on shuffled captions."""

from __future__ import annotations

import math

import numpy as np
import torch

from fusion.checkpoint import Bundle
from fusion.decoder import lm_losses
from fusion.evaluate import caption_gain
from fusion.sequences import Packer, Segment, tokenize
from tests.fusion.helpers import tiny_decoder, tiny_vocab

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def scenes(vocab, n: int, shuffled: bool, seed: int) -> list[dict]:
    """Each caption names one of four fixed code patterns; shuffled, the caption is drawn apart from it."""
    g = vocab.layout.grid
    patterns = np.random.default_rng(123).integers(0, vocab.num_codes, (len(CAPTIONS), g, g))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % len(CAPTIONS)  # neighbours differ, so "another scene's caption" is always a wrong one
        c = int(rng.integers(len(CAPTIONS))) if shuffled else k
        out.append({"caption": CAPTIONS[c], "image": patterns[k], "meta": {}})
    return out


def train(vocab, samples: list[dict], steps: int = 120) -> torch.nn.Module:
    torch.manual_seed(0)
    dec = tiny_decoder(vocab).train()
    packer = Packer(64, vocab.pad)
    packed = [p for s in samples for p in packer.add(tokenize(vocab, [Segment.txt(s["caption"], loss=False),
                                                                      Segment.img(s["image"])]))]
    packed += packer.flush()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for step in range(steps):
        chunk = [packed[(step * 8 + j) % len(packed)] for j in range(8)]
        batch = {k: torch.stack([torch.from_numpy(getattr(p, k)) for p in chunk])
                 for k in ("input_ids", "labels", "position_ids", "modality")}
        logits = dec(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = lm_losses(logits, batch["labels"], batch["modality"], 0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval()


def gain(shuffled: bool) -> dict:
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = train(vocab, scenes(vocab, 256, shuffled, seed=0))
    with torch.no_grad():
        return caption_gain(Bundle(dec, vocab, tokenizer=None, meta={}), scenes(vocab, 32, shuffled, seed=1), 64)


def test_caption_gain_is_what_the_caption_fixes_and_nothing_when_captions_are_shuffled():
    real, shuffled = gain(shuffled=False), gain(shuffled=True)
    # the caption picks one of four patterns: worth log 4 nats against no caption, more against a wrong one
    assert real["gain"] > 3.0 and real["gain_vs_empty"] > 0.7 * math.log(4)
    assert abs(shuffled["gain"]) < 0.5  # (no caption at all was never seen in training: no claim on gain_vs_empty)
    assert real["images"] == shuffled["images"] == 32 and "bound" not in real
