"""Does an image show its caption? Text-image retrieval with the contrastive model `fusion.pretrain_tower` trains.

The tower run folder holds `clip/` (the whole CLIP or SigLIP model, save_pretrained) and `text_tokenizer/`.
Each image is scored against its own caption and `others` captions drawn from the rest of the set; top-1
retrieval accuracy is the share of images whose own caption scores highest. Run on real images it is the
ceiling; on images generated from the same captions it says how much of each caption the image carries.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from data.loader import ImageTransform
from data.runtime import UserError
from fusion.adapter import CLIP_MEAN, CLIP_STD


class Retriever:
    def __init__(self, tower_run: str | Path):
        from transformers import AutoModel, PreTrainedTokenizerFast

        run = Path(tower_run)
        missing = [p for p in ("clip/config.json", "text_tokenizer/tokenizer.json") if not (run / p).is_file()]
        if missing:
            raise UserError(f"{run} is not a tower run with a contrastive model (missing {', '.join(missing)}); "
                            "train one with python -m fusion.pretrain_tower run_dir=DIR")
        self.model = AutoModel.from_pretrained(str(run / "clip")).eval()
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(run / "text_tokenizer"))
        text_cfg, vision_cfg = self.model.config.text_config, self.model.config.vision_config
        self.max_len, self.pad, self.eos = text_cfg.max_position_embeddings, len(self.tok), len(self.tok) + 1
        self.transform = ImageTransform(vision_cfg.image_size)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        rows = [self.tok.encode(c, add_special_tokens=False)[: self.max_len - 1] + [self.eos] for c in captions]
        ids = torch.tensor([r + [self.pad] * (self.max_len - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (self.max_len - len(r)) for r in rows])
        out = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    @torch.no_grad()
    def image_features(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self.transform(im.convert("RGB")) for im in images]).float() / 255
        out = self.model.get_image_features(pixel_values=(pixels - self.mean) / self.std)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    def top1(self, images: list, captions: list[str], pool: list[str] | None = None, others: int = 15,
             seed: int = 0) -> dict:
        """Image i against captions[i] and `others` distinct captions from `pool` (default: the other captions)."""
        if len(images) != len(captions) or not images:
            raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
        pool = sorted(set(pool if pool is not None else captions))
        rng = random.Random(seed)
        img = self.image_features(images)
        texts = sorted(set(pool) | set(captions))  # every caption embedded once
        row = {c: i for i, c in enumerate(texts)}
        txt = torch.cat([self.text_features(texts[i:i + 256]) for i in range(0, len(texts), 256)])
        right = 0
        for i, own in enumerate(captions):
            distractors = rng.sample([c for c in pool if c != own], min(others, len(pool) - (own in pool)))
            scores = img[i] @ txt[[row[c] for c in (own, *distractors)]].T
            right += int(scores.argmax()) == 0
        return {"top1": right / len(images), "images": len(images), "candidates": 1 + min(others, len(pool) - 1),
                "chance": 1 / (1 + min(others, len(pool) - 1))}
