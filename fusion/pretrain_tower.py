"""Contrastive pretraining of the adapter's vision tower on the same shards: `python -m fusion.pretrain_tower`.

A small CLIP (or SigLIP) is trained on image-caption pairs, then its vision model is saved with
save_pretrained to RUN/tower, the local folder the adapter baseline loads and freezes, so the
baseline never reads images through a random encoder. The whole contrastive model (both towers) is saved to
RUN/clip beside RUN/text_tokenizer: fusion.retrieval scores generated images against captions with it.
"""

from __future__ import annotations

import random
import time

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from data.loader import ImageTransform, image_stages, in_order, make_loader, train_loader
from data.runtime import ScheduledTraining, adamw_with_schedule, cli, make_trainer, run_dir_of, save_resolved_config, write_json
from data.shards import DecodePolicy, ReadStats, iter_samples
from fusion.adapter import CLIP_MEAN, CLIP_STD, TowerConfig
from fusion.vocab import train_text_tokenizer


class TowerModule(ScheduledTraining, L.LightningModule):
    def __init__(self, tower: dict, text: dict, projection_dim: int, optim: dict):
        super().__init__()
        self.save_hyperparameters()
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, SiglipConfig, SiglipModel, SiglipTextConfig

        tcfg = TowerConfig.from_dict(tower)
        # ids past the text tokenizer's own: pad and end-of-text (CLIP pools the text at its end token);
        # CLIP's default ids (49406/49407) would fall outside a small vocabulary
        text_kw = dict(vocab_size=text["vocab_size"] + 2, hidden_size=text["hidden_size"],
                       intermediate_size=4 * text["hidden_size"], num_hidden_layers=text["num_layers"],
                       num_attention_heads=text["num_heads"], max_position_embeddings=text["max_len"],
                       pad_token_id=text["vocab_size"], eos_token_id=text["vocab_size"] + 1,
                       bos_token_id=text["vocab_size"] + 1)
        if tcfg.kind == "clip":
            cfg = CLIPConfig(text_config=CLIPTextConfig(**text_kw).to_dict(),
                             vision_config=tcfg.vision_config().to_dict(), projection_dim=projection_dim)
            self.model = CLIPModel(cfg)
        else:
            cfg = SiglipConfig(text_config=SiglipTextConfig(**text_kw).to_dict(),
                               vision_config=tcfg.vision_config().to_dict())
            self.model = SiglipModel(cfg)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.data_stats = ReadStats()

    def step(self, batch):
        pixels = (batch["images"].float() / 255 - self.mean) / self.std
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                         return_loss=True)
        # in-batch retrieval: does each image pick its own caption?
        acc = (out.logits_per_image.argmax(-1) == torch.arange(len(pixels), device=pixels.device)).float().mean()
        return out.loss, acc

    def training_step(self, batch, batch_idx):
        self.data_stats.merge(batch["stats"])
        loss, acc = self.step(batch)
        if self.finite_or_skip(loss) is None:
            return None
        self.log_dict({"train/loss": loss, "train/retrieval_acc": acc})
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self.step(batch)
        self.log_dict({"val/loss": loss, "val/retrieval_acc": acc}, prog_bar=True)

    def configure_optimizers(self):
        self.clock, config = adamw_with_schedule(self.named_parameters(), self.hparams.optim, self.trainer.max_steps)
        return config

    def save_tower(self, out_dir) -> None:
        from transformers import CLIPVisionModel, SiglipVisionModel

        vision_cfg = self.model.config.vision_config
        cls = CLIPVisionModel if self.hparams.tower["kind"] == "clip" else SiglipVisionModel
        tower = cls(vision_cfg)
        # transformers 5 flattens the vision model (no .vision_model wrapper); older versions wrap it
        getattr(tower, "vision_model", tower).load_state_dict(self.model.vision_model.state_dict())
        tower.save_pretrained(str(out_dir))


def caption_item(tokenizer, max_len: int, pad: int, eos: int):
    def item(s: dict, transform: ImageTransform, rng: random.Random) -> dict:
        ids = tokenizer.encode(s["caption"], add_special_tokens=False)[: max_len - 1] + [eos]
        n = len(ids)
        return {"images": transform(s["image"], rng),
                "input_ids": torch.tensor(ids + [pad] * (max_len - n)),
                "attention_mask": torch.tensor([1] * n + [0] * (max_len - n))}
    return item


def pretrain_tower(cfg: DictConfig, run_dir) -> str:
    """Train the contrastive model described by cfg (the pretrain_tower config); returns the tower folder."""
    save_resolved_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    captions = (s["caption"] for _, s in zip(range(cfg.text.train_samples),
                                              iter_samples(cfg.data.train, DecodePolicy(draft_size=96))))
    tok = train_text_tokenizer(captions, vocab_size=cfg.text.vocab_size)
    text = {"vocab_size": len(tok), "hidden_size": cfg.text.hidden_size, "num_layers": cfg.text.num_layers,
            "num_heads": cfg.text.num_heads, "max_len": cfg.text.max_len}
    t = cfg.train
    module = TowerModule(tower=OmegaConf.to_container(cfg.tower, resolve=True), text=text,
                         projection_dim=cfg.projection_dim,
                         optim={"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay,
                                "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio})
    item = caption_item(tok, cfg.text.max_len, len(tok), len(tok) + 1)
    res = cfg.tower.image_size
    val_data = in_order(cfg.data.val, image_stages(t.batch_size, ImageTransform(res), shuffle_buffer=0, item=item))
    trainer = make_trainer(cfg.trainer, run_dir, [LearningRateMonitor("step")])
    train_data = train_loader(cfg.data.train, lambda seed: image_stages(
        t.batch_size, ImageTransform(res), seed=f"{cfg.seed}/{seed}", shuffle_buffer=t.shuffle_buffer, partial=False,
        item=item), t.num_workers, steps=lambda: trainer.global_step)
    start = time.time()
    trainer.fit(module, train_dataloaders=train_data, val_dataloaders=make_loader(val_data))
    tower_dir = run_dir / "tower"
    if trainer.is_global_zero:
        module.save_tower(tower_dir)
        module.model.save_pretrained(str(run_dir / "clip"))  # both towers: fusion.retrieval scores images with it
        tok.save_pretrained(str(run_dir / "text_tokenizer"))
        write_json(run_dir / "tower_summary.json", {
            "steps": trainer.global_step, "seconds": round(time.time() - start, 1), "tower": str(tower_dir),
            "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            "data": module.data_stats.to_json()})
        print(f"vision tower: {tower_dir}  (val retrieval accuracy "
              f"{float(trainer.callback_metrics.get('val/retrieval_acc', float('nan'))):.2f} within batches of {t.batch_size})")
    return str(tower_dir)


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain_tower")
@cli
def main(cfg: DictConfig):
    return pretrain_tower(cfg, run_dir_of(cfg))


if __name__ == "__main__":
    main()
