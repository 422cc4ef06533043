"""Seeding image-code embeddings from what each code looks like (train option seed_code_embeddings)."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_code_features_equal_plain_tables_built_from_them():
    """Factorised (FSQ level) and pixel features, into the embeddings and the head: a plain decoder given the
    folded tables computes the same logits; codes sharing a level share that level's vector."""
    from fusion.decoder import Decoder, DecoderConfig, code_rows, fsq_digits

    levels = [4, 2, 3]
    vocab = tiny_vocab(grid=2, num_codes=24)
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=64, image_pos_embed=True,
               image_layout=vocab.image_layout())
    fact = Decoder(DecoderConfig(**cfg, code_features=["levels", "pixels"], code_levels=levels, code_pixel_dim=12,
                                 code_head=True), vocab.size).eval()
    fact.set_code_pixels(torch.randn(24, 12))
    with torch.no_grad():  # large, so a mistake cannot hide under the tables' own noise
        for m in (fact.embed_tokens, fact.lm.lm_head):
            for p in code_rows(m).proj.parameters():
                p.normal_(std=1.0)
    plain = Decoder(DecoderConfig(**cfg), vocab.size).eval()
    own = {k: v for k, v in fact.state_dict().items() if "parametrizations" not in k}
    plain.load_state_dict(own, strict=False)
    emb, head = fact.plain_tables()
    plain.embed_tokens.weight.data.copy_(emb)
    plain.lm.lm_head.weight.data.copy_(head)
    ids = torch.tensor([vocab.encode_text("A red square.") + [vocab.boi, vocab.code_offset + 5, vocab.code_offset + 23,
                                                                vocab.eol, vocab.code_offset, vocab.code_offset + 17,
                                                                vocab.eol, vocab.eoi]])
    assert torch.allclose(fact(ids).logits, plain(ids).logits, atol=1e-4)
    # text rows untouched; code rows moved
    assert torch.equal(emb[:vocab.code_offset], fact.embed_tokens.parametrizations.weight.original[:vocab.code_offset])
    assert not torch.equal(emb[vocab.code_offset:], fact.embed_tokens.parametrizations.weight.original[vocab.code_offset:])
    # codes sharing a level share that level's vector: the part two such codes have in common is exactly it
    digits = fsq_digits(levels)
    assert digits.shape == (24, 3) and len({tuple(d) for d in digits.tolist()}) == 24
    rows = code_rows(fact.embed_tokens)
    level_vec = rows.proj["levels"].weight.T  # [sum(levels), hidden]
    a, b = 5, next(c for c in range(24) if digits[c, 0] == digits[5, 0] and c != 5)
    part = lambda c: level_vec[digits[c]].sum(0)
    assert torch.allclose(part(a) - level_vec[digits[a, 1:]].sum(0), level_vec[digits[a, 0]])
    assert torch.allclose(part(b) - level_vec[digits[b, 1:]].sum(0), level_vec[digits[a, 0]])


def test_code_features_are_refused_without_what_they_need():
    import pytest

    from fusion.decoder import DecoderConfig

    vocab = tiny_vocab(grid=2, num_codes=24)
    lay = vocab.image_layout()
    with pytest.raises(ValueError, match="make 12 codes, the vocabulary has 24"):
        DecoderConfig(code_features=["levels"], code_levels=[4, 3], image_layout=lay)
    with pytest.raises(ValueError, match="needs an FSQ"):
        DecoderConfig(code_features=["levels"], image_layout=lay)
    with pytest.raises(ValueError, match="code_pixel_dim"):
        DecoderConfig(code_features=["pixels"], image_layout=lay)
    with pytest.raises(ValueError, match="unknown"):
        DecoderConfig(code_features=["colour"], image_layout=lay)
    with pytest.raises(ValueError, match="code_head needs code_features"):
        DecoderConfig(code_head=True, image_layout=lay)


def test_pixel_features_are_what_the_tokenizer_draws():
    from fusion.decoder import code_pixel_features

    class FlatTokenizer:  # code c decodes to a flat grey of level c / 10
        class cfg:
            grid, downsample = 3, 2

        def decode(self, codes):
            return (codes.float() / 10)[:, None].repeat(1, 3, 2, 2)

    feats = code_pixel_features(FlatTokenizer(), 10)
    assert feats.shape == (10, 12)
    assert torch.all(feats[1:, 0] > feats[:-1, 0])  # brighter codes, larger features
    assert torch.allclose(feats.mean(0), torch.zeros(12), atol=1e-5)


def test_modality_balance_averages_each_modality_apart():
    from fusion.decoder import lm_losses

    torch.manual_seed(0)
    logits = torch.randn(1, 10, 7)
    labels = torch.randint(0, 7, (1, 10))
    modality = torch.tensor([[1] * 9 + [0]])  # nine image targets, one text target
    r = lm_losses(logits, labels, modality, 0.0)
    ce = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    assert torch.allclose(r["loss"], ce.mean())
    b = lm_losses(logits, labels, modality, 0.0, image_weight=1.0, text_weight=3.0, balance="modality")
    assert torch.allclose(b["loss"], (ce[:9].mean() + 3 * ce[9]) / 4)
    only_image = lm_losses(logits, labels, torch.ones_like(modality), 0.0, text_weight=3.0, balance="modality")
    assert torch.allclose(only_image["loss"], ce.mean())  # an absent modality takes no weight


def test_losses_match_cross_entropy_with_ignored_targets_and_z_loss():
    """lm_losses computes one logsumexp and picks the target logit by comparison; it must equal PyTorch's cross-entropy
    (ignore_index -100) plus z * mean(logsumexp^2) over the scored positions, values and gradients."""
    from fusion.decoder import lm_losses

    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 9, 11)).to(torch.bfloat16).float().requires_grad_()  # bf16 values, as autocast gives
    labels = torch.randint(0, 11, (2, 9))
    labels[0, :3] = -100
    labels[1, 7:] = -100
    modality = torch.randint(0, 2, (2, 9))
    r = lm_losses(logits, labels, modality, 1e-2)
    ref_logits = logits.detach().clone().requires_grad_()
    flat, flat_labels = ref_logits.view(-1, 11), labels.view(-1)
    keep = flat_labels != -100
    ce = torch.nn.functional.cross_entropy(flat, flat_labels, ignore_index=-100)
    zl = 1e-2 * torch.logsumexp(flat[keep], -1).square().mean()
    assert torch.allclose(r["loss"], ce + zl, atol=1e-6)
    assert torch.allclose(r["z_loss"], zl, atol=1e-7)
    img = keep & (modality.view(-1) == 1)
    per = torch.nn.functional.cross_entropy(flat, flat_labels, ignore_index=-100, reduction="none")
    assert torch.allclose(r["image_ce"], per[img].mean(), atol=1e-6)
    assert int(r["image_tokens"]) == int(img.sum()) and int(r["text_tokens"]) == int((keep & ~img).sum())
    r["loss"].backward()
    (ce + zl).backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)  # ignored positions get no gradient
    assert logits.grad[0, :3].abs().max() == 0


def _module_and_packed_batch():
    from fusion.lit import FusionModule

    vocab = tiny_vocab()
    dec = tiny_decoder(vocab)
    module = FusionModule(decoder=dec.cfg.to_dict(),
                          vocab_size=vocab.size, vocab_fingerprint="x", optim={}, loss={"image_weight": 1.0,
                          "text_weight": 1.0}, seq_len=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.size, (2, 64), generator=g)
    pos = torch.cat([torch.arange(24), torch.arange(40)]).expand(2, -1).contiguous()
    batch = {"input_ids": ids, "position_ids": pos, "labels": ids.roll(-1, 1), "modality": (ids > 200).long()}
    return module.train(), batch


def test_compiled_training_step_computes_the_eager_losses_and_keeps_weight_names():
    module, batch = _module_and_packed_batch()
    eager = module.losses(batch)["loss"]
    names = list(module.state_dict())
    module.compile_training = True
    compiled = module.losses(batch)
    assert module.compile_training and module._compiled is not None  # no fallback happened
    torch.testing.assert_close(compiled["loss"], eager, rtol=1e-4, atol=1e-5)
    compiled["loss"].backward()
    assert module.decoder.embed_tokens.weight.grad is not None
    assert list(module.state_dict()) == names  # nothing like "_orig_mod." in checkpoints
    module.eval()
    torch.testing.assert_close(module.losses(batch)["loss"], eager)  # eval: eager, the same loss


def test_the_cpu_trainer_makes_compiled_training_repeat_bit_for_bit(tmp_path):
    """conf/trainer/cpu.yaml turns on torch's deterministic algorithms through Lightning, so the compiled
    backward sums the token embeddings' gradient without atomic adds: the same batch gives the same bits every
    time (without it, two demo runs parted by step 24 and ended 12 points of VQA colour apart)."""
    from omegaconf import OmegaConf

    from data.runtime import make_trainer

    root = Path(__file__).resolve().parents[2]
    try:
        make_trainer(OmegaConf.load(root / "conf" / "trainer" / "cpu.yaml"), tmp_path, [], max_steps=1)
        assert torch.are_deterministic_algorithms_enabled()
        module, batch = _module_and_packed_batch()
        module.compile_training = True
        grads = []
        for _ in range(3):
            module.zero_grad()
            module.losses(batch)["loss"].backward()
            grads.append(module.decoder.embed_tokens.weight.grad.clone())
        assert module._compiled is not None
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_compiler_that_fails_falls_back_to_eager_training_with_one_warning(monkeypatch, capsys):
    module, batch = _module_and_packed_batch()
    eager = module.losses(batch)["loss"]

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nlong trace")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    module.compile_training = True
    torch.testing.assert_close(module.losses(batch)["loss"], eager)
    assert not module.compile_training
    out = capsys.readouterr().out
    assert out.count("warning: torch.compile failed (RuntimeError: no C++ compiler found)") == 1


def test_qk_gain_sharpens_the_attention_logits_from_the_first_step():
    """decoder.qk_gain=g starts QK-norm's gains at sqrt(g): the same seed's queries and keys come out of the norms
    sqrt(g) times larger (so their products, the logits, g times), the logits differ, and without QK-norm the
    switch is refused."""
    import pytest

    from fusion.decoder import DecoderConfig

    vocab = tiny_vocab(grid=4, num_codes=32)
    seen = {}
    for gain in (1.0, 4.0):
        torch.manual_seed(0)
        dec = tiny_decoder(vocab, qk_gain=gain)
        attn = dec.lm.model.layers[0].self_attn
        assert torch.equal(attn.q_norm.weight, torch.full_like(attn.q_norm.weight, math.sqrt(gain)))
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in (attn.q_norm, attn.k_norm)]
        codes = range(vocab.code_offset, vocab.code_offset + 5)
        ids = torch.tensor([[vocab.bos, *vocab.encode_text("a red circle"), vocab.boi, *codes]])
        with torch.no_grad():
            seen[gain] = (dec(ids).logits, outs[:2])
        for h in hooks:
            h.remove()
    (l1, (q1, k1)), (l4, (q4, k4)) = seen[1.0], seen[4.0]
    assert torch.allclose(q4, 2 * q1, atol=1e-5) and torch.allclose(k4, 2 * k1, atol=1e-5)
    assert not torch.allclose(l1, l4, atol=1e-4)
    with pytest.raises(ValueError, match="qk_gain"):
        DecoderConfig(qk_norm=False, qk_gain=2.0)


def test_mimetic_qk_starts_each_token_looking_at_tokens_like_itself():
    """decoder.mimetic_qk=[alpha, beta]: before any training, a token's query (after QK-norm, before RoPE) matches
    its own key clearly better than other tokens' keys, in every head of every block; with independent random
    queries and keys it does not; the same with query heads sharing a key head (GQA). The weights keep the plain
    init's scale; bad values are refused."""
    import pytest

    from fusion.decoder import DecoderConfig

    vocab = tiny_vocab(grid=4, num_codes=32)
    ids = torch.tensor([[vocab.bos, *vocab.encode_text("a red circle left of a blue square"), vocab.boi,
                         *range(vocab.code_offset, vocab.code_offset + 16)]])
    margins = {}
    for mimetic, kv in ((None, None), ((0.7, 0.7), None), ((0.0, 1.0), None), ((1.0, 0.3), 1)):
        torch.manual_seed(0)
        dec = tiny_decoder(vocab, mimetic_qk=mimetic, num_kv_heads=kv)   # kv=1: both query heads share a key head
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o))
                 for block in dec.lm.model.layers for m in (block.self_attn.q_norm, block.self_attn.k_norm)]
        with torch.no_grad():
            dec(ids)
        for h in hooks:
            h.remove()
        per_head = []
        for q, k in zip(outs[::2], outs[1::2]):                  # [batch, tokens, heads, head_dim]
            cos = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1]   # RMS 1 each: cosine
            eye = torch.eye(cos.shape[-1], dtype=torch.bool)
            per_head.append(cos[..., eye].mean(-1) - cos[..., ~eye].mean(-1))   # own key minus the others'
        margins[mimetic] = torch.cat([m.flatten() for m in per_head])
        wq = dec.lm.model.layers[0].self_attn.q_proj.weight
        assert not torch.allclose(wq[:16], wq[16:])                  # no two query heads start alike
        std = dec.lm.model.layers[0].self_attn.k_proj.weight.pow(2).mean().sqrt().item()
        assert abs(std - dec.cfg.init_std) < 0.1 * dec.cfg.init_std
    assert margins[None].abs().max() < 0.2                       # random: no preference for itself
    assert margins[(0.7, 0.7)].min() > 0.2 and margins[(0.0, 1.0)].min() > 0.5   # every head, every block
    assert margins[(1.0, 0.3)].min() > 0.1                      # the default, through a shared (GQA) key head
    # above hidden 512 the low-rank SVD: the same preference, query heads sharing key heads
    from fusion.decoder import mimetic_qk_

    torch.manual_seed(0)
    wq, wk = torch.empty(640, 640), torch.empty(320, 640)             # 8 query heads of 80 on 4 key heads
    mimetic_qk_(wq, wk, 8, 4, 1.0, 0.3, std=0.02)
    x = torch.randn(40, 640)
    q = torch.nn.functional.normalize((x @ wq.T).view(40, 8, 80), dim=-1)
    k = torch.nn.functional.normalize((x @ wk.T).view(40, 4, 80), dim=-1).repeat_interleave(2, dim=1)
    cos, eye = torch.einsum("thd,shd->hts", q, k), torch.eye(40, dtype=torch.bool)
    assert (cos[:, eye].mean(-1) - cos[:, ~eye].mean(-1)).min() > 0.1
    assert abs(wq.pow(2).mean().sqrt().item() - 0.02) < 1e-4
    for bad in ((1.0,), (-1.0, 1.0), (0.0, 0.0)):
        with pytest.raises(ValueError, match="mimetic_qk"):
            DecoderConfig(mimetic_qk=bad)
        with pytest.raises(ValueError, match="mimetic_vo"):
            DecoderConfig(mimetic_vo=bad)


def test_mimetic_vo_starts_each_head_returning_minus_its_input():
    """decoder.mimetic_vo=[alpha, beta]: each head's value-output map W_o_h W_v starts near alpha * Z - beta * I,
    so what a head returns points away from what it read (cosine clearly negative in every head of every block,
    through shared value heads too); random values and outputs: no sign. The queries and keys are left alone;
    the weights keep the plain init's scale."""
    vocab = tiny_vocab(grid=4, num_codes=32)
    cosines = {}
    for vo, kv in ((None, None), ((0.4, 0.4), None), ((0.0, 1.0), 1)):
        torch.manual_seed(0)
        dec = tiny_decoder(vocab, mimetic_vo=vo, num_kv_heads=kv)
        torch.manual_seed(0)
        plain = tiny_decoder(vocab, num_kv_heads=kv)
        cfg, per_head = dec.cfg, []
        dh, group = cfg.hidden_size // cfg.num_heads, cfg.num_heads // cfg.num_kv_heads
        x = torch.randn(256, cfg.hidden_size, dtype=torch.float64)
        for block, same in zip(dec.lm.model.layers, plain.lm.model.layers):
            attn = block.self_attn
            assert torch.equal(attn.q_proj.weight, same.self_attn.q_proj.weight)   # where the heads look: untouched
            wv, wo = attn.v_proj.weight.double(), attn.o_proj.weight.double()
            for h in range(cfg.num_heads):
                g = h // group
                out = x @ (wo[:, h * dh:(h + 1) * dh] @ wv[g * dh:(g + 1) * dh]).T
                per_head.append(torch.nn.functional.cosine_similarity(out, x, dim=-1).mean())
            for w in (attn.v_proj.weight, attn.o_proj.weight):
                assert abs(w.pow(2).mean().sqrt().item() - cfg.init_std) < 0.1 * cfg.init_std
        cosines[vo] = torch.stack(per_head)
    assert cosines[None].abs().max() < 0.1                       # random: no sign
    assert cosines[(0.4, 0.4)].max() < -0.1 and cosines[(0.0, 1.0)].max() < -0.2   # every head, every block


def test_init_donor_takes_exactly_the_named_parts():
    """take_init copies the named parts of another seed's weights and nothing else; all four parts make the
    other seed's decoder whole (norm gains start equal); an unknown part is a one-line error."""
    import pytest

    from data.runtime import UserError
    from fusion.decoder import take_init

    vocab = tiny_vocab(grid=4, num_codes=32)
    kw = dict(image_pos_embed=True, image_layout=vocab.image_layout(), image_pos_values=True, image_pos_values_std=0.3)
    torch.manual_seed(0)
    mine = tiny_decoder(vocab, **kw)
    torch.manual_seed(1)
    donor = tiny_decoder(vocab, **kw)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    taken = take_init(mine, donor, ["qk", "vo"])
    assert taken and all(("self_attn" in n or "value_" in n) and "norm" not in n for n in taken)
    assert any("value_rows" in n for n in taken) and any("k_proj" in n for n in taken)
    for name, p in mine.state_dict().items():
        moved = not torch.equal(p, before[name])
        assert moved == (name in taken), name  # taken ones changed, the rest did not
        if name in taken:
            assert torch.equal(p, donor.state_dict()[name])
    take_init(mine, donor, ["embeddings", "mlp"])
    assert all(torch.equal(p, donor.state_dict()[n]) for n, p in mine.state_dict().items())
    with pytest.raises(UserError, match="init_donor.parts"):
        take_init(mine, donor, ["attention"])
    torch.manual_seed(2)
    other = tiny_decoder(vocab, **kw)
    only_1 = take_init(other, donor, ["qk", "vo"], blocks=[1])
    assert only_1 and all(".1." in n for n in only_1) and len(only_1) == len(taken) // 2  # 2 blocks, one taken
    assert not torch.equal(other.lm.model.layers[0].self_attn.q_proj.weight, donor.lm.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(UserError, match="init_donor.blocks"):
        take_init(other, donor, ["qk"], blocks=[2])
