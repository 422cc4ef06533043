"""The late-fusion baseline, LLaVA-style: vision tower -> connector -> the same decoder.

Images enter the decoder as projected tower features written over placeholder tokens
(<boi> <img>*N <eoi>) in `inputs_embeds`; the decoder class is the early-fusion one, unchanged.
The tower comes from a local pretrained folder or from fusion.pretrain_tower (contrastive, on
the same shards) and is frozen by a learning rate of 0 unless configured otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from data.runtime import UserError, config_from_dict

# CLIP's normalisation constants: right for a pretrained CLIP tower, harmless for ours
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TowerConfig:
    kind: str = "clip"  # clip | siglip
    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    feature_layer: int = -2  # LLaVA: the penultimate layer's patch features
    pretrained: str | None = None  # a local folder saved by save_pretrained (never the hub)

    @classmethod
    def from_dict(cls, d: dict) -> "TowerConfig":
        return config_from_dict(cls, d, "tower")

    def to_dict(self) -> dict:
        return asdict(self)

    def vision_config(self):
        from transformers import CLIPVisionConfig, SiglipVisionConfig

        kw = dict(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size,
                  num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                  intermediate_size=self.intermediate_size)
        if self.kind == "clip":
            return CLIPVisionConfig(**kw)
        if self.kind == "siglip":
            return SiglipVisionConfig(**kw)
        raise ValueError(f"tower kind must be clip or siglip, got {self.kind!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def build_tower(cfg: TowerConfig) -> nn.Module:
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[cfg.kind]
    if cfg.pretrained:
        try:
            return cls.from_pretrained(cfg.pretrained, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a {cfg.kind} vision tower from {cfg.pretrained}: "
                            f"{str(e).splitlines()[0]}") from None
    return cls(cfg.vision_config())


class Connector(nn.Module):
    """Patch features [n, P, d_v] -> decoder inputs [n, P', d]: mlp2x_gelu (LLaVA-1.5), linear, or
    pixel_shuffle (nanoVLM: 2x2 neighbouring patches merged into one token, then the MLP)."""

    def __init__(self, kind: str, d_vision: int, d_model: int, grid: int):
        super().__init__()
        self.kind, self.grid = kind, grid
        if kind == "pixel_shuffle":
            if grid % 2:
                raise ValueError(f"pixel_shuffle needs an even patch grid, got {grid}")
            d_vision *= 4
        if kind == "linear":
            self.proj = nn.Linear(d_vision, d_model)
        elif kind in ("mlp2x_gelu", "pixel_shuffle"):
            self.proj = nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        else:
            raise ValueError(f"connector must be mlp2x_gelu, linear or pixel_shuffle, got {kind!r}")

    def tokens_per_image(self) -> int:
        return self.grid * self.grid // (4 if self.kind == "pixel_shuffle" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixel_shuffle":
            n, _, d = x.shape
            g = self.grid
            x = x.reshape(n, g // 2, 2, g // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * d)
        return self.proj(x)


class ImageEncoder(nn.Module):
    """Pixels in [0, 1] -> decoder-ready image tokens: tower features through the connector."""

    def __init__(self, tower_cfg: TowerConfig, connector: str, d_model: int):
        super().__init__()
        self.cfg = tower_cfg
        self.tower = build_tower(tower_cfg)
        d_vision = self.tower.config.hidden_size
        grid = self.tower.config.image_size // self.tower.config.patch_size
        self.connector = Connector(connector, d_vision, d_model, grid)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def tokens_per_image(self) -> int:
        return self.connector.tokens_per_image()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=(pixels - self.mean) / self.std, output_hidden_states=True)
        feats = out.hidden_states[self.cfg.feature_layer]
        if self.cfg.kind == "clip":
            feats = feats[:, 1:]  # drop CLS, keep the patch grid (LLaVA)
        return self.connector(feats)


def insert_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, placeholder: int,
                          features: torch.Tensor) -> torch.Tensor:
    """Write image features [n_images, N, d] over the placeholder positions, in reading order."""
    mask = input_ids == placeholder
    n_slots, n_feats = int(mask.sum()), features.shape[0] * features.shape[1]
    if n_slots != n_feats:
        raise ValueError(f"{n_slots} image placeholders in the batch but {features.shape[0]} images x "
                         f"{features.shape[1]} features = {n_feats}")
    embeds = embeds.clone()
    embeds[mask] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds
