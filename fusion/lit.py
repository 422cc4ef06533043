"""LightningModule for the early-fusion decoder: packed sequences in, text and image losses out."""

from __future__ import annotations

import lightning as L
import torch

from data.runtime import ScheduledTraining, adamw_with_schedule
from data.shards import ReadStats
from fusion.adapter import ImageEncoder, TowerConfig, insert_image_features
from fusion.decoder import Decoder, DecoderConfig, lm_losses


class FusionModule(ScheduledTraining, L.LightningModule):
    def __init__(self, decoder: dict, vocab_size: int, vocab_fingerprint: str, optim: dict, loss: dict,
                 seq_len: int, lr_scale: dict | None = None, stages: list | None = None):
        super().__init__()
        self.save_hyperparameters()  # plain containers only: checkpoints load with weights_only=True
        self.decoder = Decoder(DecoderConfig.from_dict(decoder), vocab_size)
        self.data_stats = ReadStats()
        self._val = {}
        cfg = self.decoder.cfg
        # FLOPs of one training batch, read by Lightning's ThroughputMonitor (set per batch size)
        self.flops_per_token = cfg.flops_per_token(seq_len)
        self.flops_per_batch = 0.0

    def inputs(self, batch) -> dict:
        """What the decoder is given; the adapter baseline overrides this to insert image features."""
        return {"input_ids": batch["input_ids"]}

    compile_training = False  # fusion.train sets it from train.compile: the training forward and loss run torch.compile'd
    _compiled = None

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """The decoder's forward and its losses (fusion/decoder.py:lm_losses). While training with
        `compile_training` both run as one torch.compile'd graph (inductor: fused kernels; with the loss over the
        [b, t, vocabulary] logits inside it, forward + backward 377 -> 345 ms on the demo's batches, 2026-12-05);
        the compiled function is held outside the module tree, so weights and checkpoints keep their names.
        Validation, curves and sampling run eagerly. Packed documents keep their own masks (tests/fusion)."""
        args = ({**self.inputs(batch), "position_ids": batch["position_ids"], "read_span": batch.get("read_span")},
                batch["labels"], batch["modality"])
        if not (self.training and self.compile_training):
            return self._forward_losses(*args)
        if self._compiled is None:
            self._compiled = (torch.compile(self._forward_losses),)
            try:
                return self._compiled[0](*args)
            except Exception as e:  # e.g. no C++ compiler on this machine: say so once, train eagerly
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "training without it (train.compile=false silences this)", flush=True)
                self.compile_training = False
                return self._forward_losses(*args)
        return self._compiled[0](*args)

    def _forward_losses(self, inputs: dict, labels: torch.Tensor, modality: torch.Tensor) -> dict[str, torch.Tensor]:
        l = self.hparams.loss
        return lm_losses(self.decoder(**inputs).logits, labels, modality, self.decoder.cfg.z_loss,
                         image_weight=l["image_weight"], text_weight=l["text_weight"], balance=l.get("balance", "token"))

    def training_step(self, batch, batch_idx):
        self.data_stats.merge(batch["stats"])
        self.flops_per_batch = self.flops_per_token * batch["input_ids"].numel() + self.extra_flops(batch)
        r = self.losses(batch)
        if self.finite_or_skip(r["loss"]) is None:
            return None
        self.log_dict({"train/loss": r["loss"], "train/text_ce": r["text_ce"], "train/image_ce": r["image_ce"],
                       "train/z_loss": r["z_loss"]})
        self.log("loss", r["loss"], prog_bar=True, logger=False)
        return r["loss"]

    def extra_flops(self, batch) -> float:
        return 0.0

    fork_steps: tuple[int, ...] = ()  # fusion.train sets it from task_phases' fork_expert
    _forked_at: int | None = None

    def on_train_batch_start(self, batch, batch_idx):
        step = self.trainer.global_step  # a resumed run past the step has the forked weights in its checkpoint
        if step in self.fork_steps and self._forked_at != step:  # once, not for every accumulated micro-batch
            from fusion.experts import fork_write_expert

            self._forked_at = step
            forked = fork_write_expert(self.decoder)
            for opt in self.trainer.optimizers:  # the copies' moments described the weights they no longer are
                for inner in (opt, *(getattr(opt, k) for k in ("muon", "adamw") if hasattr(opt, k))):
                    for p in forked:
                        inner.state.pop(p, None)
            print(f"step {step}: the writing expert restarts as a copy of the shared weights "
                  f"({sum(p.numel() for p in forked):,} parameters)", flush=True)

    def on_train_start(self):
        super().on_train_start()  # starts the schedule's clock (wall-time budgets, curves' minutes)
        self.first_step = self.trainer.global_step  # > 0 when resumed: this process's speed counts from here

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.clock.flops += self.flops_per_batch
        if self.clock.flops_budget and self.clock.flops >= self.clock.flops_budget:
            self.trainer.should_stop = True  # the compute-matched budget is spent

    @property
    def train_flops(self) -> float:
        """Measured training FLOPs so far (kept across resumes with the schedule's clock)."""
        return self.clock.flops if hasattr(self, "clock") else 0.0

    def on_validation_epoch_start(self):
        self._val = {"text": [0.0, 0], "image": [0.0, 0]}

    def validation_step(self, batch, batch_idx):
        r = self.losses(batch)
        for kind in ("text", "image"):
            n = int(r[f"{kind}_tokens"])
            self._val[kind][0] += float(r[f"{kind}_ce"]) * n
            self._val[kind][1] += n

    def on_validation_epoch_end(self):
        metrics = {}
        for kind, (total, n) in self._val.items():
            if n:
                metrics[f"val/{kind}_ce"] = total / n
        if metrics:
            t, i = self._val["text"], self._val["image"]
            metrics["val/loss"] = (t[0] + i[0]) / max(1, t[1] + i[1])
            self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        self.clock, config = adamw_with_schedule(self.named_parameters(), self.hparams.optim, self.trainer.max_steps,
                                                 lr_scale=self.hparams.lr_scale, stages=self.hparams.stages)
        return config


class AdapterModule(FusionModule):
    """The late-fusion baseline: the same decoder, with tower -> connector features at the placeholders."""

    def __init__(self, decoder: dict, vocab_size: int, vocab_fingerprint: str, optim: dict, loss: dict,
                 seq_len: int, tower: dict, connector: str, placeholder_id: int, lr_scale: dict | None = None,
                 stages: list | None = None):
        super().__init__(decoder, vocab_size, vocab_fingerprint, optim, loss, seq_len, lr_scale, stages)
        self.image_encoder = ImageEncoder(TowerConfig.from_dict(tower), connector, self.decoder.cfg.hidden_size)
        frozen = (lr_scale or {}).get("image_encoder.tower", 1.0) == 0
        if frozen:
            self.image_encoder.tower.requires_grad_(False)
        self.flops_per_image = image_encoder_flops(self.image_encoder, trainable_tower=not frozen)

    def on_train_epoch_start(self):
        if not any(p.requires_grad for p in self.image_encoder.tower.parameters()):
            self.image_encoder.tower.eval()  # a frozen tower keeps its dropout off

    def inputs(self, batch) -> dict:
        ids = batch["input_ids"]
        embeds = self.decoder.embed_tokens(ids)
        images = [im for seq in batch.get("images", []) for im in seq]
        feats = (self.image_encoder(torch.stack(images).to(embeds.device).float() / 255) if images
                 else embeds.new_zeros(0, self.image_encoder.tokens_per_image, embeds.shape[-1]))
        return {"inputs_embeds": insert_image_features(embeds, ids, self.hparams.placeholder_id, feats)}

    def extra_flops(self, batch) -> float:
        return self.flops_per_image * sum(len(seq) for seq in batch.get("images", []))


def image_encoder_flops(enc, trainable_tower: bool) -> float:
    """Per image: the tower's forward (2 x params x patches), x3 when it trains; the connector x6."""
    tower_params = sum(p.numel() for n, p in enc.tower.named_parameters() if "embeddings" not in n)
    patches = enc.connector.grid ** 2 + 1
    conn_params = sum(p.numel() for p in enc.connector.parameters())
    return (6 if trainable_tower else 2) * tower_params * patches + 6 * conn_params * enc.tokens_per_image
