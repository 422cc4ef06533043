"""Tiny real components for fusion tests: a BPE vocabulary and a random-init decoder, built in-process."""

from __future__ import annotations

import numpy as np

from data.shapes import WorldConfig, make_sample
from fusion.decoder import Decoder, DecoderConfig
from fusion.vocab import ImageLayout, MultimodalVocab, train_text_tokenizer


def tiny_vocab(grid: int = 4, num_codes: int = 32, row_separator: bool = True) -> MultimodalVocab:
    world = WorldConfig()
    texts = []
    for i in range(200):
        s = make_sample(world, "train", i)
        texts.append(s["caption"])
        texts += [f"Q: {qa['q']} A: {qa['a']}" for qa in s["meta"]["qa"]]
    return MultimodalVocab(train_text_tokenizer(texts, vocab_size=300), num_codes, ImageLayout(grid, row_separator))


def tiny_decoder(vocab: MultimodalVocab, **kw) -> Decoder:
    cfg = DecoderConfig(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=256, **kw)
    return Decoder(cfg, vocab.size).eval()


def random_codes(vocab: MultimodalVocab, seed: int = 0) -> np.ndarray:
    g = vocab.layout.grid
    return np.random.default_rng(seed).integers(0, vocab.num_codes, (g, g))
