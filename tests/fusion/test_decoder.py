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


def test_grid_cells_place_every_code_of_every_image_in_a_packed_sequence():
    """2-D position embeddings: each code gets its (row + 1, column + 1); text, specials and padding get 0."""
    from fusion.sequences import Segment, pack, tokenize
    from tests.fusion.helpers import random_codes

    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab, image_pos_embed=True, image_layout=vocab.image_layout())
    images = [random_codes(vocab, seed=s) for s in range(3)]
    docs = [tokenize(vocab, [Segment.txt("A red circle."), Segment.img(images[0])]),
            tokenize(vocab, [Segment.img(images[1]), Segment.txt("Q: What? A: yes"), Segment.img(images[2])])]
    ids = torch.from_numpy(pack(docs, 128, vocab.pad).input_ids)
    cells = dec.grid_cells(ids[None])[0]
    is_code = vocab.is_code(ids)
    assert torch.equal(cells[~is_code], torch.zeros_like(cells[~is_code]))
    placed = cells[is_code].view(3, 16, 2)  # three images of 4 x 4, in reading order
    want = torch.tensor([(r + 1, c + 1) for r in range(4) for c in range(4)])
    for i in range(3):
        assert torch.equal(placed[i], want)
    # the sampler's one-token-at-a-time view agrees with the whole-sequence one
    offsets = range(1, vocab.layout.span_len)
    assert [vocab.layout.cell(o) for o in offsets if vocab.layout.kind_at(o) == "code"] == [tuple(w) for w in want.tolist()]


def test_image_pos_embed_is_refused_without_a_layout_and_saved_with_the_model(tmp_path):
    import pytest

    from fusion.decoder import DecoderConfig

    with pytest.raises(ValueError, match="image_layout"):
        DecoderConfig(image_pos_embed=True)
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab, image_pos_embed=True, image_layout=vocab.image_layout())
    cfg = DecoderConfig.from_dict(dec.cfg.to_dict())
    assert cfg.image_layout == vocab.image_layout() and cfg.image_pos_embed
    assert {"image_rows.weight", "image_cols.weight"} <= set(dec.state_dict())
