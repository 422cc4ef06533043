"""The sampler's guarantees on a random-init decoder: exact grids, no codes in text, CFG, KV cache."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from fusion.generate import Generator, SamplingConfig
from tests.fusion.helpers import tiny_decoder, tiny_vocab

@contextmanager
def nudged(dec, token: int, amount: float):
    """Add `amount` to one token's logit (a forward hook on the output head) while inside."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., token] += amount
        return output

    handle = dec.lm.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


PROMPTS = ["A picture of a red circle.", "Two objects on a grey background: a green cross and a blue square.", ""]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    vocab = tiny_vocab(grid=4, num_codes=32)
    return vocab, tiny_decoder(vocab)


def t2i_prompts(vocab):
    return [[vocab.bos, *vocab.encode_text(p), vocab.boi] for p in PROMPTS]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_image_spans_hold_exactly_h_times_w_codes(setup, cfg_scale):
    vocab, dec = setup
    sc = SamplingConfig(temperature=1.5, cfg_scale=cfg_scale, max_new_tokens=vocab.layout.span_len)
    for seed in range(3):
        for out in Generator(dec, vocab).generate(t2i_prompts(vocab), sc, seed=seed):
            span = [vocab.boi, *out]
            codes = vocab.decode_image(span)  # raises unless the layout is exact
            assert codes.shape == (4, 4)
            assert int(vocab.is_code(out).sum()) == 16 and out[-1] == vocab.eoi


def test_free_running_text_may_open_images_but_they_are_whole(setup):
    vocab, dec = setup
    with nudged(dec, vocab.boi, 4.0):  # push the random model towards <boi> so spans do get opened
        sc = SamplingConfig(temperature=1.0, allow_images=True, max_images=2, max_new_tokens=120)
        outs = Generator(dec, vocab).generate([[vocab.bos, *vocab.encode_text(p)] for p in PROMPTS], sc, seed=1)
    opened = 0
    for out in outs:
        i = 0
        while i < len(out):
            if out[i] == vocab.boi:
                vocab.decode_image(out[i:i + vocab.layout.span_len])
                opened += 1
                i += vocab.layout.span_len
                continue
            assert not vocab.is_code(out[i]) and out[i] not in (vocab.eol, vocab.eoi)
            i += 1
    assert opened >= 1


def test_text_mode_never_emits_image_tokens(setup):
    vocab, dec = setup
    sc = SamplingConfig(temperature=2.0, allow_images=False, max_new_tokens=40)
    for out in Generator(dec, vocab).generate([[vocab.bos, *vocab.encode_text(p)] for p in PROMPTS], sc, seed=2):
        assert not vocab.is_code(out).any() and vocab.boi not in out and vocab.eoi not in out


def test_cfg_unconditional_stream_differs_and_changes_samples(setup):
    vocab, _ = setup
    torch.manual_seed(1)
    dec = tiny_decoder(vocab, init_std=0.5)  # a random model whose outputs depend on the prompt
    seen = []
    hook = dec.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        sc = SamplingConfig(temperature=1.0, cfg_scale=3.0, max_new_tokens=vocab.layout.span_len)
        guided = Generator(dec, vocab).generate(t2i_prompts(vocab)[:2], sc, seed=5)
    finally:
        hook.remove()
    prefill = seen[0]
    assert prefill.shape[0] == 4  # two conditional rows, two unconditional
    for r in range(2):
        cond = prefill[r][prefill[r] != vocab.pad].tolist()
        uncond = prefill[r + 2][prefill[r + 2] != vocab.pad].tolist()
        assert cond != uncond and uncond == [vocab.bos, vocab.boi]
    plain = Generator(dec, vocab).generate(t2i_prompts(vocab)[:2], SamplingConfig(temperature=1.0, cfg_scale=1.0,
                                           max_new_tokens=vocab.layout.span_len), seed=5)
    assert guided != plain


def test_kv_cache_matches_full_recompute(setup):
    vocab, dec = setup
    prompts = [[vocab.bos, *vocab.encode_text(p)] for p in PROMPTS]
    sc = dict(temperature=0, allow_images=True, max_images=1, max_new_tokens=30)
    with_cache = Generator(dec, vocab).generate(prompts, SamplingConfig(**sc, use_cache=True))
    without = Generator(dec, vocab).generate(prompts, SamplingConfig(**sc, use_cache=False))
    assert with_cache == without


def test_stop_at_newline(setup):
    vocab, dec = setup
    newline = vocab.encode_text("\n")
    assert len(newline) == 1
    with nudged(dec, newline[0], 2.0):
        sc = SamplingConfig(temperature=0, allow_images=False, stop_at_newline=True, max_new_tokens=30)
        outs = Generator(dec, vocab).generate([[vocab.bos, *vocab.encode_text("Q: What? A:")]], sc)
    assert outs[0][-1] == newline[0] and newline[0] not in outs[0][:-1]


def test_min_new_tokens_holds_eos_back(setup):
    """A caption after an image: <eos> is what an unconditional image document does next, so captioning asks for
    at least one token first."""
    vocab, dec = setup
    prompt = [[vocab.bos, *vocab.encode_image(torch.zeros(4, 4, dtype=torch.long).numpy())]]
    with nudged(dec, vocab.eos, 50.0):
        free = Generator(dec, vocab).generate(prompt, SamplingConfig(temperature=0, allow_images=False))[0]
        held = Generator(dec, vocab).generate(prompt, SamplingConfig(temperature=0, allow_images=False,
                                                                     min_new_tokens=3))[0]
    assert free == [vocab.eos]
    assert len(held) == 4 and vocab.eos not in held[:3] and held[3] == vocab.eos


@pytest.mark.parametrize("texts", [("A red circle.", "Two objects on a grey background."), ("A red circle.",)],
                         ids=["left_padded", "one_row"])
@pytest.mark.parametrize("kw", [dict(qk_norm=True), dict(qk_norm=False), dict(num_kv_heads=1)],
                         ids=["qwen3_qk_norm", "llama", "grouped_kv"])
def test_lean_kv_cache_logits_equal_transformers_full_forward(kw, texts):
    """fusion/kvcache.py re-implements the block for speed: every step's logits must be transformers' own,
    for left-padded rows of different lengths, a multi-token prefill and single-token steps."""
    from fusion.kvcache import StaticKVCache, supported
    from fusion.generate import _left_pad

    torch.manual_seed(3)
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab, init_std=0.3, **kw)
    assert supported(dec.lm)
    rows = [[vocab.bos, *vocab.encode_text(p)] for p in texts]
    ids, attn = _left_pad(rows, vocab.pad, "cpu")
    B = len(rows)
    kv = StaticKVCache(dec.lm, batch=B, max_len=ids.shape[1] + 5)
    got = [kv.forward(attn, dec.embed(ids))]
    for _ in range(5):
        nxt = torch.randint(0, vocab.size, (B, 1))
        ids, attn = torch.cat([ids, nxt], 1), torch.cat([attn, torch.ones_like(nxt)], 1)
        got.append(kv.forward(torch.ones_like(nxt), dec.embed(nxt)))
    # the reference: transformers' forward over the whole padded sequence, no cache
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    full = dec.lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    want = full[:, -6:]
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="longer than the cache"):
        kv.forward(torch.ones(B, 1, dtype=torch.long), dec.embed(torch.zeros(B, 1, dtype=torch.long)))


def test_transformers_dynamic_cache_fallback_matches_full_recompute(setup, monkeypatch):
    """Architectures the lean cache does not know run on transformers' DynamicCache: same tokens."""
    import fusion.kvcache

    vocab, dec = setup
    monkeypatch.setattr(fusion.kvcache, "supported", lambda lm: False)
    prompts = [[vocab.bos, *vocab.encode_text(p)] for p in PROMPTS]
    sc = dict(temperature=0, allow_images=True, max_images=1, max_new_tokens=30)
    with_cache = Generator(dec, vocab).generate(prompts, SamplingConfig(**sc, use_cache=True))
    without = Generator(dec, vocab).generate(prompts, SamplingConfig(**sc, use_cache=False))
    assert with_cache == without


@pytest.mark.parametrize("positions", ["input", "every_layer", "values"])
@pytest.mark.parametrize("runner", ["lean_cache", "no_cache", "dynamic_cache"])
def test_sampler_places_codes_where_the_full_forward_does(runner, positions, monkeypatch):
    """With 2-D position embeddings the sampler tells the model each new code's grid cell; the cells must
    be the ones Decoder.grid_cells reads off the finished sequence: greedy sampling then equals the
    argmax of one full forward over the result, code by code. The same when the positions are added again
    before every block (decoder.image_pos_every_layer) or to every block's attention values
    (decoder.image_pos_values), through each of the sampler's three forwards."""
    import fusion.kvcache

    if runner == "dynamic_cache":
        monkeypatch.setattr(fusion.kvcache, "supported", lambda lm: False)
    use_cache = runner != "no_cache"
    torch.manual_seed(2)
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab, init_std=0.5, image_pos_embed=True, image_layout=vocab.image_layout(),
                       image_pos_every_layer=positions == "every_layer", image_pos_values=positions == "values")
    dec.image_rows.weight.data *= 20  # make the grid cell decide: a wrong cell would change the argmax
    if positions == "values":  # (they start at zero) large enough that a wrong cell changes the argmax
        for e in (*dec.value_rows, *dec.value_cols):
            torch.nn.init.normal_(e.weight, std=3.0)
            e.weight.data[0].zero_()
    prompt = [vocab.bos, *vocab.encode_text("A picture of a red circle."), vocab.boi]
    out = Generator(dec, vocab).generate([prompt], SamplingConfig(temperature=0, max_new_tokens=vocab.layout.span_len,
                                                                  use_cache=use_cache))[0]
    full = torch.tensor([prompt + out])
    logits = dec(input_ids=full, position_ids=torch.arange(full.shape[1])[None]).logits[0]
    for i, tok in enumerate(out):
        if vocab.is_code(tok):
            at = len(prompt) - 1 + i  # the logits that chose out[i]
            assert int(logits[at, vocab.code_offset:].argmax()) + vocab.code_offset == tok


def test_positions_before_every_block_change_the_function_and_only_the_codes():
    """image_pos_every_layer adds the 2-D embeddings before blocks 1.. too: the same weights then give other
    logits after an image's codes, the same logits for text before any image."""
    torch.manual_seed(4)
    vocab = tiny_vocab(grid=4, num_codes=32)
    kw = dict(init_std=0.3, image_pos_embed=True, image_layout=vocab.image_layout())
    once, again = tiny_decoder(vocab, **kw), tiny_decoder(vocab, **kw, image_pos_every_layer=True)
    again.load_state_dict(once.state_dict())  # no new parameters: the state dicts have the same keys
    text = [vocab.bos, *vocab.encode_text("A red circle.")]
    ids = torch.tensor([text + vocab.encode_image(torch.arange(16).reshape(4, 4).numpy())])
    a, b = (d(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0] for d in (once, again))
    torch.testing.assert_close(a[:len(text) + 1], b[:len(text) + 1])  # up to <boi>: no code seen yet
    assert (a[len(text) + 2:] - b[len(text) + 2:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image_pos_every_layer needs image_pos_embed"):
        tiny_decoder(vocab, image_pos_every_layer=True)


def test_positions_in_the_values_start_as_the_plain_function_and_change_only_the_codes():
    """image_pos_values adds per-block row / column tables to image codes' attention values: zero at the start
    (the same function as without), and once learned they change the logits after an image's codes only."""
    torch.manual_seed(4)
    vocab = tiny_vocab(grid=4, num_codes=32)
    kw = dict(init_std=0.3, image_pos_embed=True, image_layout=vocab.image_layout())
    plain, values = tiny_decoder(vocab, **kw), tiny_decoder(vocab, **kw, image_pos_values=True)
    values.load_state_dict(plain.state_dict(), strict=False)
    text = [vocab.bos, *vocab.encode_text("A red circle.")]
    ids = torch.tensor([text + vocab.encode_image(torch.arange(16).reshape(4, 4).numpy())])
    pos = torch.arange(ids.shape[1])[None]
    torch.testing.assert_close(plain(input_ids=ids, position_ids=pos).logits, values(input_ids=ids, position_ids=pos).logits)
    for e in (*values.value_rows, *values.value_cols):
        torch.nn.init.normal_(e.weight, std=1.0)
        e.weight.data[0].zero_()
    a, b = (d(input_ids=ids, position_ids=pos).logits[0] for d in (plain, values))
    torch.testing.assert_close(a[:len(text) + 1], b[:len(text) + 1])  # up to <boi>: no code seen yet
    assert (a[len(text) + 2:] - b[len(text) + 2:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image_pos_values needs image_pos_embed"):
        tiny_decoder(vocab, image_pos_values=True)


def test_positions_in_the_values_can_start_random():
    """image_pos_values_std > 0 starts the tables at that spread (row 0, "not an image code", stays zero), so
    the codes' values carry their cell from the first step; 0 starts them at zero."""
    torch.manual_seed(5)
    vocab = tiny_vocab(grid=4, num_codes=32)
    kw = dict(image_pos_embed=True, image_layout=vocab.image_layout(), image_pos_values=True)
    zero, rand = tiny_decoder(vocab, **kw), tiny_decoder(vocab, **kw, image_pos_values_std=0.5)
    assert all(e.weight.abs().max() == 0 for e in (*zero.value_rows, *zero.value_cols))
    for e in (*rand.value_rows, *rand.value_cols):
        assert e.weight[0].abs().max() == 0
        assert 0.3 < e.weight[1:].std().item() < 0.7
