"""The tokenizer's API: encode/decode shapes, the indices <-> codes round trip, save/load and refusals."""

from __future__ import annotations

import math

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


def test_code_determinism_measure_by_hand():
    from tokenizer.metrics import CodeDeterminism

    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)  # 2 x 2 patches of 8 px, all black
    images[:, 0, :8, :8] = 255  # top-left patch red in both images
    same = CodeDeterminism()
    same.update(images, torch.tensor([[[1, 2], [2, 2]], [[1, 2], [2, 2]]]))
    r = same.result()
    assert r["code_given_patch_nats"] == 0 and r["distinct_patches"] == 2
    assert r["codes_per_flat_patch"] == {"rgb(0,0,0)": 1, "rgb(255,0,0)": 1}
    split = CodeDeterminism()  # the black patch written with two codes, half the time each
    split.update(images, torch.tensor([[[1, 2], [3, 2]], [[1, 3], [3, 2]]]))
    r = split.result()
    assert r["code_given_patch_nats"] == pytest.approx(6 / 8 * math.log(2), abs=1e-4)
    assert r["codes_per_flat_patch"]["rgb(0,0,0)"] == 2
    assert same.result()["patches_on_a_shared_code"] == 0 and same.result()["codes_used"] == 2
    merged = CodeDeterminism()  # red and black written with one code: the 2 red patches of 8 are not its usual one
    merged.update(images, torch.full((2, 2, 2), 5))
    assert merged.result()["patches_on_a_shared_code"] == pytest.approx(2 / 8) and merged.result()["codes_used"] == 1


def scenes(n: int) -> torch.Tensor:
    """Shapes-world renders as uint8 [n, 3, 48, 48]: many equal flat patches in different surroundings."""
    import numpy as np

    from data.shapes import WorldConfig, render, sample_scene

    world = WorldConfig()
    return torch.stack([torch.from_numpy(np.array(render(sample_scene(world, "train", i)))).permute(2, 0, 1)
                        for i in range(n)])


def test_a_patch_encoder_writes_equal_patches_with_equal_codes_a_conv_encoder_does_not():
    from tokenizer.metrics import CodeDeterminism

    images = scenes(24)
    result = {}
    for encoder in ("patch", "conv"):
        torch.manual_seed(0)
        cfg = TokenizerConfig(resolution=48, channels=(8, 16, 16, 16), z_channels=16, encoder=encoder,
                              quantizer="fsq", fsq_levels=(8, 8, 8))
        model = VQTokenizer(cfg).eval()
        det = CodeDeterminism()
        det.update(images, model.encode(images.float() / 255))
        result[encoder] = det.result()
    assert result["patch"]["code_given_patch_nats"] == 0
    assert all(n == 1 for n in result["patch"]["codes_per_flat_patch"].values())
    assert result["conv"]["code_given_patch_nats"] > 0.1
    assert max(result["conv"]["codes_per_flat_patch"].values()) > 3


def test_patch_encoder_is_local_a_change_outside_a_patch_leaves_its_code():
    torch.manual_seed(0)
    model = VQTokenizer(TokenizerConfig(resolution=32, channels=(8, 16, 16), z_channels=16, encoder="patch",
                                        quantizer="fsq", fsq_levels=(8, 8, 8))).eval()
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[..., :4, :4] = 1 - y[..., :4, :4]  # only the top-left 4 px patch changes
    a, b = model.encode(x), model.encode(y)
    assert torch.equal(a[..., 1:, :], b[..., 1:, :]) and torch.equal(a[..., 0, 1:], b[..., 0, 1:])
