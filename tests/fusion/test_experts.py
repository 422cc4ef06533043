"""decoder.write_expert: the codes of an image the model writes run through their own copy of the block weights
(fusion/experts.py). Started equal it is the plain function; its copy changes only the written tokens' paths; a
read image's loss never reaches it; sampling routes the tokens as training does; training, reload, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.runtime import UserError
from fusion.experts import Routed, fork_write_expert
from fusion.generate import Generator, SamplingConfig
from fusion.sequences import Segment, pack, tokenize
from tests.conftest import run_module
from tests.fusion.helpers import random_codes, tiny_decoder, tiny_vocab


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab(grid=4, num_codes=32)


def plain_state(routed_state: dict) -> dict:
    """A write-expert decoder's reading weights under a plain decoder's names."""
    return {k.replace(".base.", "."): v for k, v in routed_state.items() if ".write." not in k}


def documents(vocab):
    """A read image with a question (no loss on its codes), then a written image after a caption, packed."""
    read = tokenize(vocab, [Segment.img(random_codes(vocab, 1), loss=False),
                            Segment.txt("Q: What colour is the circle? A:", loss=False), Segment.txt(" red", loss=True)])
    write = tokenize(vocab, [Segment.txt("A picture of a red circle.", loss=False),
                             Segment.img(random_codes(vocab, 2), loss=True)])
    p = pack([read, write], 256, vocab.pad)
    t = {k: v[None] for k, v in p.as_tensors().items()}
    return t, len(read)


def kw(vocab, **extra):
    return {"init_std": 0.3, "image_pos_embed": True, "image_layout": vocab.image_layout(), **extra}


def test_started_equal_it_is_the_plain_decoder_and_its_copy_moves_only_the_written_image(vocab):
    torch.manual_seed(0)
    expert = tiny_decoder(vocab, **kw(vocab, write_expert=True))
    plain = tiny_decoder(vocab, **kw(vocab))
    plain.load_state_dict(plain_state(expert.state_dict()))
    t, n_read = documents(vocab)
    args = dict(input_ids=t["input_ids"], position_ids=t["position_ids"], read_span=t["read_span"])
    torch.testing.assert_close(expert(**args).logits, plain(**args).logits)
    route = expert.route(t["input_ids"], t["read_span"])[0]
    ids = t["input_ids"][0]
    assert not route[:n_read].any()  # the read image and its question: the reading weights
    assert int(route.sum()) == 1 + vocab.layout.grid ** 2 and bool(route[ids == vocab.boi].tolist()[-1])
    with torch.no_grad():
        for m in expert.modules():
            if isinstance(m, Routed):
                for p in m.write.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    a, b = expert(**args).logits[0], plain(**args).logits[0]
    first_written = int(route.nonzero()[0])
    torch.testing.assert_close(a[:first_written], b[:first_written])  # the read document and the caption
    assert (a[first_written:] - b[first_written:]).abs().max() > 1e-2
    forked = fork_write_expert(expert)  # the copy restarts from the shared weights: the plain function again
    assert len(forked) == sum(1 for m in expert.modules() if isinstance(m, Routed) for _ in m.write.parameters())
    torch.testing.assert_close(expert(**args).logits, plain(**args).logits)
    with pytest.raises(ValueError, match="write_expert needs image_layout"):
        tiny_decoder(vocab, write_expert=True)


def test_a_read_images_loss_never_reaches_the_writing_copy(vocab):
    torch.manual_seed(1)
    dec = tiny_decoder(vocab, **kw(vocab, write_expert=True)).train()
    t, n_read = documents(vocab)
    out = dec(input_ids=t["input_ids"], position_ids=t["position_ids"], read_span=t["read_span"]).logits[0]
    labels = t["labels"][0]

    def grads(mask):
        dec.zero_grad()
        loss = torch.nn.functional.cross_entropy(out[:-1][mask[1:]], labels[1:][mask[1:]], reduction="sum")
        loss.backward(retain_graph=True)
        write = sum(float(p.grad.abs().sum()) for n, p in dec.named_parameters() if ".write." in n and p.grad is not None)
        base = sum(float(p.grad.abs().sum()) for n, p in dec.named_parameters() if ".base." in n and p.grad is not None)
        return write, base

    positions = torch.arange(len(labels))
    answer = (labels != -100) & (positions < n_read)
    image = (labels != -100) & (positions >= n_read)
    assert answer.any() and image.any()
    write, base = grads(answer)
    assert write == 0 and base > 0
    write, base = grads(image)
    assert write > 0 and base > 0  # the caption's keys and values come from the reading weights


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_sampler_routes_as_training_does(vocab, use_cache):
    """A greedily drawn image, fed back teacher-forced as training packs it (its span written, not read), gives
    the codes it was drawn with: the prompt's <boi> and each fed-back code took the writing weights."""
    torch.manual_seed(2)
    dec = tiny_decoder(vocab, **kw(vocab, write_expert=True, init_std=0.5))
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, Routed):
                for p in m.write.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    prompt = [vocab.bos, *vocab.encode_text("A picture of a red circle."), vocab.boi]
    sc = SamplingConfig(temperature=0, max_new_tokens=vocab.layout.span_len, use_cache=use_cache)
    out = Generator(dec, vocab).generate([prompt], sc)[0]
    full = torch.tensor([prompt + out])
    pos = torch.arange(full.shape[1])[None]
    logits = dec(input_ids=full, position_ids=pos, read_span=torch.zeros_like(full)).logits[0]
    as_read = dec(input_ids=full, position_ids=pos).logits[0]  # a complete image with no read_span: read
    codes = [i for i, tok in enumerate(out) if vocab.is_code(tok)]
    assert len(codes) == vocab.layout.grid ** 2
    for i in codes:
        at = len(prompt) - 1 + i
        assert int(logits[at, vocab.code_offset:].argmax()) + vocab.code_offset == out[i]
    assert (logits[len(prompt):] - as_read[len(prompt):]).abs().max() > 1e-2


@pytest.mark.slow
def test_a_write_expert_run_trains_reloads_samples_and_refuses_export(tiny_codes, shapes_root, tmp_path):
    from fusion.checkpoint import load_bundle
    from fusion.export import export
    from tests.fusion.test_train import TINY

    run = tmp_path / "run"
    proc = run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY,
                      "decoder.write_expert=true", "train.compile=true", "curves.gain_images=4", "curves.vqa_images=2",
                      "curves.judge_per_type=1", "task_phases=[{at:12,tasks:{t2i:0.5,vqa:0.5},fork_expert:true}]")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 16 and not summary["compiled"]  # routing trains eagerly, and says so when asked
    assert "write_expert trains without torch.compile" in proc.stdout
    assert proc.stdout.count("the writing expert restarts as a copy of the shared weights") == 1
    assert "step 12: the writing expert restarts" in proc.stdout
    bundle = load_bundle(run / "model")
    assert bundle.decoder.cfg.write_expert
    names = [n for n, _ in bundle.decoder.named_parameters()]
    assert any(".write." in n for n in names) and any(".base." in n for n in names)
    v = bundle.vocab
    out = Generator(bundle.decoder, v).generate([[v.bos, *v.encode_text("A red circle."), v.boi]],
                                                SamplingConfig(max_new_tokens=v.layout.span_len))[0]
    assert np.asarray(v.decode_image([v.boi, *out])).shape == (v.layout.grid, v.layout.grid)
    with pytest.raises(UserError, match="write_expert"):
        export(run / "model", tmp_path / "export")
