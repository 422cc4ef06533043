"""Train the VQ image tokenizer: `python -m tokenizer.train [hydra overrides]`.

Writes into the run folder: config.yaml (resolved), checkpoints/ (Lightning, for resume),
tokenizer/ (model.safetensors + config.json: what everything downstream loads), metrics.json,
data_stats.json and val_reconstructions.png.
"""

from __future__ import annotations

import time

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from data.loader import DecodedCache, ImageTransform, image_stages, in_order, make_loader, train_loader
from data.runtime import (audit_callback, checkpoint_callbacks, cli, make_trainer, resume_checkpoint, run_dir_of, save_resolved_config, world_size,
                          write_json)
from tokenizer.checkpoint import save_tokenizer
from data.shapes import world_of
from tokenizer.evaluate import evaluate_tokenizer, summary_line
from tokenizer.lit import TokenizerModule


def build_module(cfg: DictConfig, grid_dir: str | None) -> TokenizerModule:
    t = cfg.train
    return TokenizerModule(
        model=OmegaConf.to_container(cfg.tokenizer, resolve=True),
        optim={"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay,
               "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio,
               "schedule": t.get("schedule", "cosine"), "decay_frac": t.get("decay_frac", 0.2),
               "time_budget_s": 60 * t.time_budget_min if t.get("time_budget_min") else None},
        loss={"l1": t.l1, "l2": t.l2, "edge_weight": t.get("edge_weight", 0.0)}, channels_last=t.channels_last, grid_dir=grid_dir)


def train(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    # vector-quantize-pytorch decides codebook sync at construction, before the process group exists
    OmegaConf.update(cfg, "tokenizer.sync_codebook", world_size(cfg.trainer) > 1, force_add=True)
    save_resolved_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, grid_dir=str(run_dir))

    t, res = cfg.train, int(cfg.tokenizer.resolution)
    val_data = in_order(cfg.data.val, image_stages(t.val_batch_size, ImageTransform(res), shuffle_buffer=0))
    overrides = {}
    if t.get("time_budget_min"):  # stop when the budget is spent; the schedule has cooled down by then
        overrides["max_time"] = {"seconds": int(60 * t.time_budget_min)}
    callbacks = [*checkpoint_callbacks(run_dir, cfg.checkpoint_every, "val/psnr", "max"), LearningRateMonitor("step")]
    callbacks += [audit_callback(run_dir)] if cfg.get("audit") else []
    trainer = make_trainer(cfg.trainer, run_dir, callbacks, **overrides)
    start = time.time()
    ckpt_path = resume_checkpoint(cfg.get("resume"), run_dir, expect={"model": module.hparams.model})
    cache = DecodedCache(t.cache_mb) if t.get("cache_mb") and not t.num_workers else None  # one cache, every epoch
    transform = ImageTransform(res, t.crop, crop_step=module.model.cfg.downsample, crop_tries=t.get("crop_tries", 1))
    train_data = train_loader(cfg.data.train, lambda seed: image_stages(
        t.batch_size, transform, seed=f"{cfg.seed}/{seed}", shuffle_buffer=t.shuffle_buffer, partial=False, cache=cache),
        t.num_workers, steps=lambda: trainer.global_step)
    trainer.fit(module, train_dataloaders=train_data, val_dataloaders=make_loader(val_data), ckpt_path=ckpt_path)
    train_s = time.time() - start

    if not trainer.is_global_zero:
        return {}
    export = save_tokenizer(module.model.cpu(), run_dir / "tokenizer",
                            extra={"train_steps": trainer.global_step, "train_seconds": round(train_s, 1)})
    metrics = evaluate_tokenizer(export, cfg.data.val, run_dir, batch_size=t.val_batch_size, name="val",
                                 world=world_of(cfg.data), ceiling_per_type=cfg.get("ceiling_per_type", 160))
    metrics.update(train_steps=trainer.global_step, train_seconds=round(train_s, 1),
                   precision=str(trainer.precision), tokenizer=str(export))
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "data_stats.json", module.data_stats.to_json())
    print(f"tokenizer: {export}  {summary_line(metrics)}  ({trainer.global_step} steps, {train_s / 60:.1f} min)")
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="train_tokenizer")
@cli
def main(cfg: DictConfig):
    torch.set_float32_matmul_precision("high")
    return train(cfg)


if __name__ == "__main__":
    main()
