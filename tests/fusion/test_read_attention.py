"""decoder.read_attention=bidirectional: the codes of an image the model reads see each other both ways,
everything else stays causal; training (packed documents), teacher forcing and sampling agree on it."""

from __future__ import annotations

import pytest
import torch

from fusion.decoder import DecoderConfig, attention_mask, read_spans
from fusion.generate import Generator, SamplingConfig
from fusion.sequences import Segment, pack, tokenize
from tests.fusion.helpers import random_codes, tiny_decoder, tiny_vocab


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab(grid=4, num_codes=32, row_separator=False)


def packed_reading_and_writing(vocab):
    """One sequence: a caption document (reads its image), a text-to-image one (writes it), a VQA one."""
    docs = [tokenize(vocab, [Segment.img(random_codes(vocab, 0), loss=False), Segment.txt("A red circle.")]),
            tokenize(vocab, [Segment.txt("A blue square.", loss=False), Segment.img(random_codes(vocab, 1))]),
            tokenize(vocab, [Segment.img(random_codes(vocab, 2), loss=False), Segment.txt("Q: What? A:", loss=False),
                             Segment.txt(" red\n")])]
    return pack(docs, 128, vocab.pad), docs


def test_pack_marks_the_read_images_only(vocab):
    p, docs = packed_reading_and_writing(vocab)
    span = vocab.layout.span_len  # <boi> ... <eoi>
    ids, read = p.input_ids, p.read_span
    assert sorted(set(read.tolist())) == [0, 1, 2]  # two read images, numbered apart across documents
    for k in (1, 2):
        where = (read == k).nonzero()[0]
        assert len(where) == span and ids[where[0]] == vocab.boi and ids[where[-1]] == vocab.eoi
        assert (where == range(where[0], where[0] + span)).all()
    written = len(docs[0]) + len(docs[1]) - span - 1  # the t2i image (before its <eos>)
    assert ids[written] == vocab.boi and read[written:written + span].max() == 0
    # what the sampler reads off a prompt: its complete images (an open span, being written, is not one)
    row = torch.from_numpy(ids[:len(docs[0])])[None]
    assert torch.equal(read_spans(row, vocab.boi, vocab.eoi), torch.from_numpy(read[:len(docs[0])])[None])
    t2i_prompt = torch.tensor([[vocab.bos, *vocab.encode_text("A red circle."), vocab.boi]])
    assert read_spans(t2i_prompt, vocab.boi, vocab.eoi).max() == 0


def test_mask_is_causal_per_document_plus_each_read_span(vocab):
    p, docs = packed_reading_and_writing(vocab)
    pos, read = torch.from_numpy(p.position_ids)[None], torch.from_numpy(p.read_span)[None]
    m = attention_mask(pos, read)[0, 0]
    causal = attention_mask(pos, torch.zeros_like(read))[0, 0]
    first, second = len(docs[0]), len(docs[0]) + len(docs[1])
    assert not causal.triu(1).any() and not causal[first, first - 1] and causal[first + 1, first]
    extra = m & ~causal  # what bidirectional reading adds: later codes of the same read image, nothing else
    q, k = extra.nonzero().T
    assert (read[0, q] == read[0, k]).all() and (read[0, q] > 0).all() and (k > q).all()
    assert extra.sum() == 2 * sum(n * (n - 1) // 2 for n in [vocab.layout.span_len])
    assert not m[:, second:][:second].any()  # documents still never see each other


def test_bidirectional_reading_changes_only_the_read_image_and_what_follows(vocab):
    torch.manual_seed(0)
    causal = tiny_decoder(vocab, init_std=0.3, image_pos_embed=True, image_layout=vocab.image_layout())
    both = tiny_decoder(vocab, init_std=0.3, image_pos_embed=True, image_layout=vocab.image_layout(),
                        read_attention="bidirectional")
    both.load_state_dict(causal.state_dict())
    p, docs = packed_reading_and_writing(vocab)
    t = {k: v[None] for k, v in p.as_tensors().items()}
    a = causal(input_ids=t["input_ids"], position_ids=t["position_ids"], read_span=t["read_span"]).logits
    b = both(input_ids=t["input_ids"], position_ids=t["position_ids"], read_span=t["read_span"]).logits
    # no read span: the explicit mask computes what transformers' packed causal mask does
    none = both(input_ids=t["input_ids"], position_ids=t["position_ids"],
                read_span=torch.zeros_like(t["read_span"])).logits
    torch.testing.assert_close(none, a)
    first = len(docs[0])
    t2i = slice(first, first + len(docs[1]))  # the writing document is untouched
    torch.testing.assert_close(b[0, t2i], a[0, t2i])
    boi = int((t["read_span"][0] == 1).nonzero()[0])
    assert not torch.allclose(b[0, boi], a[0, boi])  # <boi> of a read image already sees its codes
    # the caption after the image changes too (it reads contextualised codes), and a code's logits now depend
    # on a code after it: change the last code, the first code's output moves
    ids2 = t["input_ids"].clone()
    last_code = boi + vocab.layout.span_len - 2
    ids2[0, last_code] = vocab.code_offset + (int(ids2[0, last_code]) - vocab.code_offset + 1) % vocab.num_codes
    b2 = both(input_ids=ids2, position_ids=t["position_ids"], read_span=t["read_span"]).logits
    a2 = causal(input_ids=ids2, position_ids=t["position_ids"], read_span=t["read_span"]).logits
    assert not torch.allclose(b2[0, boi + 1], b[0, boi + 1]) and torch.allclose(a2[0, boi + 1], a[0, boi + 1])


@pytest.mark.parametrize("lean", [True, False], ids=["lean_cache", "transformers"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_reads_the_prompt_image_as_training_does(vocab, lean, use_cache, monkeypatch):
    """Greedy answers from the sampler (left-padded prompts of different lengths, each ending after a read
    image and a question) equal the argmax of one full forward with the training mask, token by token."""
    import fusion.kvcache

    if not lean:
        monkeypatch.setattr(fusion.kvcache, "supported", lambda lm: False)
    torch.manual_seed(1)
    dec = tiny_decoder(vocab, init_std=0.5, image_pos_embed=True, image_layout=vocab.image_layout(),
                       read_attention="bidirectional")
    prompts = [tokenize(vocab, [Segment.img(random_codes(vocab, s), loss=False), Segment.txt(q, loss=False)],
                        add_eos=False).ids for s, q in ((3, "Q: What colour? A:"), (4, "Q: Where? A:"))]
    outs = Generator(dec, vocab).generate(prompts, SamplingConfig(temperature=0, allow_images=False, max_new_tokens=4,
                                                                  use_cache=use_cache))
    for prompt, out in zip(prompts, outs):
        full = torch.tensor([prompt + out])
        spans = read_spans(full, vocab.boi, vocab.eoi)
        logits = dec(input_ids=full, position_ids=torch.arange(full.shape[1])[None], read_span=spans).logits[0]
        for i, tok in enumerate(out):
            allowed = torch.tensor([*range(vocab.text_size), vocab.eos])  # what a reading answer may emit
            assert int(allowed[logits[len(prompt) - 1 + i, allowed].argmax()]) == tok


def test_unknown_read_attention_is_refused():
    with pytest.raises(ValueError, match="read_attention"):
        DecoderConfig(read_attention="full")


def test_bidirectional_reading_compiles_without_a_graph_break(vocab):
    """The training step is compiled whole: deciding whether a batch holds read spans must not break the graph."""
    torch._dynamo.reset()
    both = tiny_decoder(vocab, image_pos_embed=True, image_layout=vocab.image_layout(),
                        read_attention="bidirectional")
    p, _ = packed_reading_and_writing(vocab)
    t = {k: v[None] for k, v in p.as_tensors().items()}
    explained = torch._dynamo.explain(lambda **kw: both(**kw).logits)(
        input_ids=t["input_ids"], position_ids=t["position_ids"], read_span=t["read_span"])
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
