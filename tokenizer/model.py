"""The VQ image tokenizer: a convolutional autoencoder around a vector-quantize-pytorch quantizer.

`encode(images) -> LongTensor[b, h, w]` and `decode(codes) -> images` are the whole public
surface the rest of the project uses; everything downstream sees images only as codes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from data.runtime import config_from_dict


@dataclass
class TokenizerConfig:
    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 128)  # one entry per level; each level after the first halves H, W
    # conv: a convolutional encoder whose receptive field spans neighbouring patches (a code then depends on
    # its surroundings too, so equal patches can get different codes); patch: each f x f patch is encoded
    # alone (space-to-depth, then per-patch layers), so a code is a function of its patch's pixels.
    encoder: str = "conv"
    patch_hidden: int = 256  # patch encoder: width of its per-patch layers
    patch_layers: int = 2
    blocks_per_level: int = 1
    norm: bool = True
    z_channels: int = 64
    quantizer: str = "vq"  # vq | fsq | lfq
    codebook_size: int = 1024  # vq and lfq; fsq's size is the product of fsq_levels
    codebook_dim: int = 8  # vq: low-dimensional codes (LlamaGen uses 8) with cosine similarity
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    commitment_weight: float = 0.25
    ema_decay: float = 0.95
    dead_code_threshold: float = 2.0  # vq: expire codes used fewer times than this per batch
    kmeans_init: bool = True
    rotation_trick: bool = True
    lfq_entropy_weight: float = 0.1
    sync_codebook: bool = False  # set by the trainer from the world size (decided at construction)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.fsq_levels = tuple(self.fsq_levels)
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"tokenizer.encoder must be conv or patch, got {self.encoder!r}")
        if self.quantizer not in ("vq", "fsq", "lfq"):
            raise ValueError(f"tokenizer.quantizer must be vq, fsq or lfq, got {self.quantizer!r}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling {self.downsample}")
        if self.quantizer == "lfq" and 2 ** round(math.log2(self.codebook_size)) != self.codebook_size:
            raise ValueError(f"lfq needs a power-of-two codebook_size, got {self.codebook_size}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def num_codes(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return config_from_dict(cls, d, "tokenizer")


def _groups(c: int) -> int:
    return math.gcd(c, 32) if c >= 32 else math.gcd(c, 8)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool = True):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        cin = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(cin, c, cfg.norm))
                cin = c
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(cin), cin) if cfg.norm else nn.Identity()
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class PatchEncoder(nn.Module):
    """Each f x f patch alone -> its feature vector: space-to-depth, then 1x1 convolutions (no mixing across
    patches), so equal patches always get equal codes."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        f, h = cfg.downsample, cfg.patch_hidden
        layers: list[nn.Module] = [nn.PixelUnshuffle(f), nn.Conv2d(3 * f * f, h, 1)]
        for _ in range(cfg.patch_layers - 1):
            layers += [nn.SiLU(), nn.Conv2d(h, h, 1)]
        layers += [nn.SiLU(), nn.Conv2d(h, cfg.z_channels, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        cin = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(cin, c, cfg.norm))
                cin = c
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(cin), cin) if cfg.norm else nn.Identity()
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


@contextmanager
def full_precision():
    """vector-quantize-pytorch only turns off CUDA autocast; distances and EMA need fp32 on CPU too."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


class Quantizer(nn.Module):
    """One interface over VectorQuantize, FSQ and LFQ: features [b, d, h, w] <-> indices [b, h, w]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.kind = cfg.quantizer
        d = cfg.z_channels
        if self.kind == "vq":
            self.q = VectorQuantize(
                dim=d, codebook_size=cfg.codebook_size, codebook_dim=cfg.codebook_dim,
                use_cosine_sim=True, kmeans_init=cfg.kmeans_init, kmeans_iters=10,
                threshold_ema_dead_code=cfg.dead_code_threshold, decay=cfg.ema_decay,
                commitment_weight=cfg.commitment_weight, rotation_trick=cfg.rotation_trick,
                accept_image_fmap=True, sync_codebook=cfg.sync_codebook,
            )
        elif self.kind == "fsq":
            self.q = FSQ(levels=list(cfg.fsq_levels), dim=d)
        else:
            self.q = LFQ(dim=d, codebook_size=cfg.codebook_size, entropy_loss_weight=cfg.lfq_entropy_weight,
                         commitment_loss_weight=cfg.commitment_weight)

    def forward(self, z: torch.Tensor):
        """Returns (quantized features, indices [b, h, w], auxiliary loss)."""
        with full_precision():
            z = z.float()
            if self.kind == "vq":
                zq, idx, aux = self.q(z)
            elif self.kind == "fsq":
                zq, idx = self.q(z)
                aux = z.new_zeros(())
            else:
                zq, idx, aux = self.q(z)
        return zq, idx.long(), aux

    def features(self, indices: torch.Tensor) -> torch.Tensor:
        with full_precision():
            if self.kind == "vq":
                # get_output_from_indices applies project_out after moving channels first
                # when accept_image_fmap is set (1.32), so look the codes up ourselves.
                codes = self.q.project_out(self.q.codebook[indices])
                return codes.permute(0, 3, 1, 2)
            return self.q.indices_to_codes(indices)


class VQTokenizer(nn.Module):
    """Images in [0, 1], shape [b, 3, H, W] <-> codes, shape [b, H/f, W/f]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, images: torch.Tensor):
        """Returns (reconstruction in [-1, 1] space, indices, quantizer auxiliary loss)."""
        zq, idx, aux = self.quantizer(self.encoder(images * 2 - 1))
        return self.decoder(zq.to(images.dtype) if images.is_floating_point() else zq), idx, aux

    def _check_images(self, images: torch.Tensor):
        r = self.cfg.resolution
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (r, r):
            raise ValueError(f"expected images of shape [b, 3, {r}, {r}], got {list(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        _, idx, _ = self.quantizer(self.encoder(images * 2 - 1))
        return idx

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid
        if codes.ndim != 3 or codes.shape[-2:] != (g, g):
            raise ValueError(f"expected codes of shape [b, {g}, {g}], got {list(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.cfg.num_codes:
            raise ValueError(f"codes must lie in [0, {self.cfg.num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
        zq = self.quantizer.features(codes.long())
        return ((self.decoder(zq) + 1) / 2).clamp(0, 1)
