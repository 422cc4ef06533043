"""The tokenizer's API: encode/decode shapes, the indices <-> codes round trip, save/load and refusals."""

from __future__ import annotations

import pytest
import torch

from data.runtime import UserError
from tokenizer.checkpoint import WEIGHTS, load_tokenizer, save_tokenizer
from tokenizer.model import TokenizerConfig, VQTokenizer

QUANTIZERS = {
    "vq": dict(quantizer="vq", codebook_size=64),
    "fsq": dict(quantizer="fsq", fsq_levels=(4, 4, 4)),
    "lfq": dict(quantizer="lfq", codebook_size=64),
}


def tiny(kind: str, **kw) -> TokenizerConfig:
    return TokenizerConfig(resolution=32, channels=(8, 16), z_channels=16, **{**QUANTIZERS[kind], **kw})


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_encode_decode_shapes_and_index_round_trip(kind):
    torch.manual_seed(0)
    model = VQTokenizer(tiny(kind))
    x = torch.rand(4, 3, 32, 32)
    model.train()
    model(x)  # the first forward initialises the VQ codebook (k-means)
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (4, 16, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.cfg.num_codes
    # indices -> code vectors must give back exactly what the quantizer produced in the forward pass
    z = model.encoder(x * 2 - 1)
    zq, idx, _ = model.quantizer(z)
    assert torch.equal(idx, codes)
    assert torch.allclose(model.quantizer.features(idx), zq, atol=1e-5)
    images = model.decode(codes)
    assert images.shape == (4, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_decode_refuses_bad_codes():
    model = VQTokenizer(tiny("vq")).eval()
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 16, 16), 64))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(1, 3, 48, 48))


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_save_load_gives_identical_codes_and_images(tmp_path, kind):
    torch.manual_seed(1)
    model = VQTokenizer(tiny(kind))
    x = torch.rand(3, 3, 32, 32)
    model.train()
    model(x)
    model.eval()
    save_tokenizer(model, tmp_path)
    loaded = load_tokenizer(tmp_path, expect=tiny(kind))
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))


def test_loading_refuses_a_mismatched_config(tmp_path):
    save_tokenizer(VQTokenizer(tiny("vq")), tmp_path)
    with pytest.raises(UserError, match="codebook_size: saved 64, expected 128"):
        load_tokenizer(tmp_path, expect={"codebook_size": 128})
    with pytest.raises(UserError, match="quantizer"):
        load_tokenizer(tmp_path, expect=tiny("fsq"))


def test_truncated_or_missing_weights_fail_in_one_line(tmp_path):
    save_tokenizer(VQTokenizer(tiny("vq")), tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable or truncated") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "elsewhere")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TokenizerConfig(resolution=30, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="quantizer"):
        TokenizerConfig(quantizer="pq")
    with pytest.raises(ValueError, match="unknown tokenizer config keys"):
        TokenizerConfig.from_dict({"resolution": 32, "colour": 1})
