"""Documents -> packed sequences: targets, loss masks, modality labels, document isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.sequences import IGNORE, Packer, Segment, pack, tokenize
from tests.fusion.helpers import random_codes, tiny_decoder, tiny_vocab


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


def test_loss_mask_covers_answers_and_images_only(vocab):
    codes = random_codes(vocab)
    doc = tokenize(vocab, [Segment.img(codes, loss=False), Segment.txt("Q: What colour is the circle? A:", loss=False),
                           Segment.txt(" red\n", loss=True)])
    p = pack([doc], 128, vocab.pad)
    targets = p.labels[p.labels != IGNORE]
    assert vocab.decode_text(targets.tolist()) == " red\n" or vocab.decode_text(targets[:-1].tolist()) == " red\n"
    assert targets[-1] == vocab.eos  # the answer ends the document, so <eos> is a target too
    assert (p.modality[p.labels != IGNORE] == 0).all()

    t2i = tokenize(vocab, [Segment.txt("A picture of a red circle.", loss=False), Segment.img(codes, loss=True)])
    p = pack([t2i], 128, vocab.pad)
    tgt = p.labels != IGNORE
    span = vocab.layout.span_len
    assert tgt.sum() == span + 1  # <boi> ... <eoi> and <eos>
    assert (p.modality[tgt][:span] == 1).all()
    # the target at each position is the next input token
    idx = np.nonzero(tgt)[0]
    assert (p.labels[idx] == p.input_ids[idx + 1]).all()


def test_packing_keeps_documents_whole_and_restarts_positions(vocab):
    docs = [tokenize(vocab, [Segment.txt("word " * n)]) for n in (10, 30, 5, 50, 20, 8)]
    packer = Packer(64, vocab.pad, open_bins=2)
    out = [p for d in docs for p in packer.add(d)] + packer.flush()
    assert sum(p.documents for p in out) == len(docs)
    for p in out:
        starts = np.nonzero(p.position_ids == 0)[0]
        assert all(p.input_ids[s] in (vocab.bos, vocab.pad) for s in starts)
        assert (p.labels[p.input_ids == vocab.pad] == IGNORE).all()
    packer = Packer(64, vocab.pad)
    (cut,) = packer.add(tokenize(vocab, [Segment.txt("word " * 200)]))
    assert len(cut.input_ids) == 64 and packer.truncated == 1 and cut.documents == 1


def test_packed_documents_do_not_see_each_other(vocab):
    """Changing document A must not change the decoder's outputs on document B packed after it."""
    torch.manual_seed(0)
    dec = tiny_decoder(vocab)
    b = tokenize(vocab, [Segment.txt("A picture of a blue square.")])
    outs = []
    for a_text in ("A picture of a red circle.", "Two objects: a green cross and a yellow diamond."):
        p = pack([tokenize(vocab, [Segment.txt(a_text)]), b], 64, vocab.pad)
        start = int(np.nonzero((p.position_ids == 0) & (p.input_ids == vocab.bos))[0][1])
        t = p.as_tensors()
        with torch.no_grad():
            logits = dec(input_ids=t["input_ids"][None], position_ids=t["position_ids"][None]).logits[0]
        outs.append(logits[start:start + len(b)])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
