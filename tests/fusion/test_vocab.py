"""The joint vocabulary: disjoint id ranges, text and image round trips, save/load with fingerprint checks."""

from __future__ import annotations

import numpy as np
import pytest

from data.runtime import UserError
from fusion.vocab import SPECIALS, ImageLayout, MultimodalVocab, load_text_tokenizer
from tests.fusion.helpers import random_codes, tiny_vocab


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


def test_id_ranges_never_collide(vocab):
    text = set(range(vocab.text_size))
    specials = set(vocab.special.values())
    codes = set(range(vocab.code_offset, vocab.size))
    assert len(specials) == len(SPECIALS) and not (text & specials) and not (text & codes) and not (specials & codes)
    assert vocab.size == len(text) + len(specials) + vocab.num_codes
    ids = vocab.encode_text("A picture of three red squares and a blue circle.")
    assert all(i < vocab.text_size for i in ids)
    assert vocab.is_code(vocab.encode_image(random_codes(vocab))[1:-1]).sum() == vocab.layout.grid ** 2


def test_text_round_trip_including_unseen_characters(vocab):
    for s in ["A small red circle at the top left on a white background.", "Q: How many crosses are there? A: 2",
              "caf\u00e9, \u00fcber, 12345 \u2764"]:
        assert vocab.decode_text(vocab.encode_text(s)) == s


@pytest.mark.parametrize("row_separator", [True, False])
def test_image_round_trip_and_layout(row_separator):
    v = tiny_vocab(grid=5, num_codes=40, row_separator=row_separator)
    codes = random_codes(v, seed=3)
    span = v.encode_image(codes)
    assert len(span) == v.layout.span_len == 2 + 25 + (5 if row_separator else 0)
    assert span[0] == v.boi and span[-1] == v.eoi
    assert np.array_equal(v.decode_image(span), codes)
    kinds = [v.layout.kind_at(k) for k in range(1, v.layout.span_len)]
    assert kinds.count("code") == 25 and kinds[-1] == "eoi" and kinds.count("eol") == (5 if row_separator else 0)
    broken = list(span)
    broken[3] = v.eos
    with pytest.raises(ValueError):
        v.decode_image(broken)


def test_split_mixed_sequence(vocab):
    a, b = random_codes(vocab, 1), random_codes(vocab, 2)
    ids = vocab.encode_text("first") + vocab.encode_image(a) + vocab.encode_text(" then") + vocab.encode_image(b)
    parts = vocab.split(ids + [vocab.eos] + vocab.encode_text("ignored"))
    assert parts[0] == "first" and np.array_equal(parts[1], a) and parts[2] == " then" and np.array_equal(parts[3], b)
    assert len(parts) == 4


def test_bad_images_are_refused(vocab):
    with pytest.raises(ValueError, match="grid"):
        vocab.encode_image(np.zeros((3, 3), dtype=int))
    with pytest.raises(ValueError, match="range"):
        vocab.encode_image(np.full((4, 4), vocab.num_codes))


def test_save_load_and_fingerprint_check(vocab, tmp_path):
    vocab.save(tmp_path / "v")
    back = MultimodalVocab.load(tmp_path / "v", expect_fingerprint=vocab.fingerprint())
    assert back.size == vocab.size and back.fingerprint() == vocab.fingerprint()
    assert back.encode_text("a blue cross") == vocab.encode_text("a blue cross")
    other = tiny_vocab(grid=4, num_codes=64)
    with pytest.raises(UserError, match="not the one the checkpoint was trained with"):
        MultimodalVocab.load(tmp_path / "v", expect_fingerprint=other.fingerprint())
    with pytest.raises(UserError, match="no vocabulary"):
        MultimodalVocab.load(tmp_path / "missing")


def test_text_tokenizer_loads_from_a_local_file_or_directory(vocab, tmp_path):
    vocab.text_tokenizer.save_pretrained(str(tmp_path / "tok"))
    from_dir = load_text_tokenizer(tmp_path / "tok")
    from_file = load_text_tokenizer(tmp_path / "tok" / "tokenizer.json")
    s = "How many objects are there?"
    assert from_dir.encode(s, add_special_tokens=False) == from_file.encode(s, add_special_tokens=False) == \
        vocab.encode_text(s)
    with pytest.raises(UserError):
        load_text_tokenizer(tmp_path / "nope")


def test_a_tokenizer_json_that_is_missing_broken_or_not_bpe_is_refused_in_one_line(vocab, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    with pytest.raises(UserError, match="no text tokenizer at"):
        load_text_tokenizer(tmp_path / "missing" / "tokenizer.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {"type": "BPE", ')
    with pytest.raises(UserError, match="is not a tokenizer.json"):
        load_text_tokenizer(broken)
    wordlevel = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    wordlevel.save(str(tmp_path / "wordlevel.json"))
    with pytest.raises(UserError, match="holds a WordLevel tokenizer, not BPE") as e:
        load_text_tokenizer(tmp_path / "wordlevel.json")
    assert "\n" not in str(e.value)
    (tmp_path / "wl").mkdir()
    (tmp_path / "wl" / "tokenizer.json").write_text((tmp_path / "wordlevel.json").read_text())
    with pytest.raises(UserError, match="not BPE"):
        load_text_tokenizer(tmp_path / "wl")


def test_a_pretrained_lm_keeps_its_text_rows_and_sets_the_decoder_shape(vocab, tmp_path):
    """decoder.init_from: an LM of another width than the preset's; its text rows survive the resize and the
    2-D position tables take the LM's width."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fusion.decoder import Decoder, DecoderConfig

    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.text_size, hidden_size=96, intermediate_size=192,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24))
    lm.save_pretrained(str(tmp_path / "lm"))
    vocab.text_tokenizer.save_pretrained(str(tmp_path / "lm"))
    cfg = DecoderConfig(hidden_size=256, num_layers=6, num_heads=4, init_from=str(tmp_path / "lm"),
                        image_pos_embed=True, image_layout=vocab.image_layout())
    dec = Decoder(cfg, vocab.size)
    text_rows = dec.embed_tokens.weight[: vocab.text_size]
    assert torch.equal(text_rows, lm.get_input_embeddings().weight)
    assert dec.embed_tokens.weight.shape == (vocab.size, 96) and dec.image_rows.weight.shape[1] == 96
    assert (dec.cfg.hidden_size, dec.cfg.num_layers, dec.cfg.num_kv_heads) == (96, 2, 2)
    assert (cfg.hidden_size, cfg.num_layers) == (256, 6)  # the caller's config is left as given
    ids = torch.tensor([[vocab.bos, *vocab.encode_text("a red circle"), vocab.boi, vocab.code_offset + 3]])
    assert dec(input_ids=ids).logits.shape == (1, ids.shape[1], vocab.size)
