"""Seeding image-code embeddings from what each code looks like (train option seed_code_embeddings)."""

from __future__ import annotations

import math

import torch

from fusion.decoder import seed_code_embeddings
from tests.fusion.helpers import tiny_decoder, tiny_vocab


class TwoColourTokenizer:
    """Even codes decode to red, odd codes to blue: a stand-in whose looks we know exactly."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        red = (codes[:, :1, :1] % 2 == 0).float().view(-1, 1, 1, 1)
        colour = red * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1) + (1 - red) * torch.tensor([0, 0, 1.0]).view(1, 3, 1, 1)
        return colour.expand(-1, 3, 8, 8)


def test_codes_that_look_alike_get_the_same_head_start_and_text_is_untouched():
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab)
    before = dec.embed_tokens.weight.detach().clone()
    seed_code_embeddings(dec, vocab.code_offset, vocab.num_codes, vocab.layout.grid, TwoColourTokenizer())
    after = dec.embed_tokens.weight.detach()
    assert torch.equal(after[:vocab.code_offset], before[:vocab.code_offset])  # text and specials unchanged
    look = after[vocab.code_offset:] * math.sqrt(2) - before[vocab.code_offset:]
    assert torch.allclose(look[0], look[2], atol=1e-6) and torch.allclose(look[1], look[3], atol=1e-6)
    assert not torch.allclose(look[0], look[1])
    assert look.std() < 3 * dec.cfg.init_std  # the same scale as the random initialisation


def test_seeding_is_deterministic():
    vocab = tiny_vocab(grid=4, num_codes=32)
    a, b = tiny_decoder(vocab), tiny_decoder(vocab)
    b.load_state_dict(a.state_dict())
    for d in (a, b):
        seed_code_embeddings(d, vocab.code_offset, vocab.num_codes, vocab.layout.grid, TwoColourTokenizer())
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
