"""Learning curves: what the model can do, measured at every validation, against training minutes and tokens.

At each validation a small fixed evaluation runs on validation scenes: the caption's information gain
(`val/caption_gain`, nats per image against the empty caption; `val/caption_gain_vs_other` against another
scene's caption), VQA accuracy per question type, and on the shapes world the judge
per prompt type and per attribute. Each point is logged, appended to curves.json and drawn into curves.png
in the run folder, so a change to the recipe shows *what* moved and when.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from data.shapes import WorldConfig
from fusion.checkpoint import Bundle
from fusion.generate import SamplingConfig


@dataclass
class CurveConfig:
    gain_images: int = 64  # validation images for the caption gain (0: off)
    vqa_images: int = 24  # validation images whose questions are asked (~9 each; 0: off)
    judge_per_type: int = 8  # prompts per judge type (0: off; shapes world only)
    cfg_scale: float = 6.0
    temperature: float = 0.7
    top_k: int = 20


class LearningCurves(Callback):
    def __init__(self, vocab, tokenizer, samples: list[dict], seq_len: int, tokens_per_step: int,
                 world: WorldConfig | None, out: Path, cc: CurveConfig, meta: dict | None = None):
        self.vocab, self.tokenizer, self.samples, self.seq_len = vocab, tokenizer, samples, seq_len
        self.tokens_per_step = tokens_per_step  # per rank: batch size x sequence length
        self.world, self.out, self.cc, self.meta = world, out, cc, meta or {}
        self.points: list[dict] = json.loads((out / "curves.json").read_text()) if (out / "curves.json").is_file() else []
        self.eval_s = 0.0

    def measure(self, decoder) -> dict:
        from fusion.evaluate import caption_gain, generation_scores, vqa_accuracy

        bundle = Bundle(decoder, self.vocab, self.tokenizer, meta=self.meta)
        point: dict = {}
        images = [{**s, "image": s["codes"]} for s in self.samples]
        if self.cc.gain_images and len(images) >= 2:
            g = caption_gain(bundle, images[:self.cc.gain_images], self.seq_len, self.world)
            point["caption_gain"] = g["gain_vs_empty"]
            point["caption_gain_vs_other"] = g["gain"]
            if "fraction_of_bound" in g:
                point["caption_gain_fraction"] = g["fraction_of_bound"]
        if self.cc.vqa_images:
            vqa = vqa_accuracy(bundle, images[:self.cc.vqa_images], max_questions=10_000)
            point.update({f"vqa_{k}": v for k, v in vqa.get("per_type", {}).items()})
            if vqa:
                point["vqa_all"] = vqa["accuracy"]
            if vqa.get("description"):  # a describe-first model: the cells its own descriptions name right
                point["vqa_description_cells"] = vqa["description"]["cells"]
        if self.cc.judge_per_type and self.world is not None:
            sc = SamplingConfig(temperature=self.cc.temperature, top_k=self.cc.top_k, cfg_scale=self.cc.cfg_scale,
                                max_new_tokens=self.vocab.layout.span_len)
            j = generation_scores(bundle, self.world, self.cc.judge_per_type, sc, None, seed=0, split="val")
            point.update({f"judge_{k}": v for k, v in j["per_type"].items()})
            point["judge_all"] = j["pass_rate"]
            point.update({f"judge_attr_{k}": v for k, v in j["attributes"].items()})
        return point

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        t = time.time()
        was_training = pl_module.training
        pl_module.eval()
        decoder = pl_module.decoder
        if str(trainer.precision).startswith("bf16"):  # trained under bf16 autocast: measured on a bf16 copy, as
            decoder = copy.deepcopy(decoder).to(torch.bfloat16)  # fusion.evaluate does (data.runtime.inference_dtype)
        with torch.no_grad():
            point = self.measure(decoder)
        if was_training:
            pl_module.train()
        self.eval_s += time.time() - t
        clock = getattr(pl_module, "clock", None)
        point = {"step": trainer.global_step, "minutes": round(clock.elapsed() / 60, 3) if clock else None,
                 "tokens": trainer.global_step * self.tokens_per_step * trainer.world_size, "eval_s": round(time.time() - t, 1), **point}
        self.points = [p for p in self.points if p["step"] < point["step"]] + [point]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "curves.json").write_text(json.dumps(self.points, indent=1) + "\n")
        plot_curves(self.points, self.out / "curves.png")
        for logger in trainer.loggers:  # rank zero only, so not self.log (which would wait for the other ranks)
            logger.log_metrics({f"val/{k}": float(v) for k, v in point.items()
                                if k.startswith(("caption_gain", "vqa_", "judge_")) and v is not None},
                               step=trainer.global_step)
        shown = {k: point[k] for k in ("caption_gain", "vqa_all", "judge_single", "judge_all") if k in point}
        print(f"curves at step {trainer.global_step}: " + "  ".join(f"{k}={v:.3g}" for k, v in shown.items())
              + f"  ({point['eval_s']:.0f} s) -> {self.out / 'curves.png'}", flush=True)


LABELS = {"caption_gain": "vs the empty caption (information)", "caption_gain_vs_other": "vs another scene's caption"}


def plot_curves(points: list[dict], path: Path) -> Path:
    """Three panels against training minutes (tokens on the top axis): judge, VQA, caption gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["minutes"] for p in points]
    panels = [("judge pass rate (val prompts)", "judge_"), ("VQA accuracy (val)", "vqa_"),
              ("caption gain (nats per image)", "caption_gain")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, prefix) in zip(axes, panels):
        keys = sorted({k for p in points for k in p if k.startswith(prefix) and k != "caption_gain_fraction"})
        for k in keys:
            ax.plot(x, [p.get(k) for p in points], marker="o", ms=3, label=LABELS.get(k, k.removeprefix(prefix)),
                    lw=2 if k.endswith(("all", "single")) else 1)
        ax.set_title(title)
        ax.set_xlabel("training minutes (wall clock, evaluation included)")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7, ncol=2)
        if prefix != "caption_gain":
            ax.set_ylim(-0.02, 1.02)
        tokens = [p.get("tokens") for p in points]
        if all(tokens) and len(points) > 1 and x[-1] > x[0]:
            rate = (tokens[-1] - tokens[0]) / (x[-1] - x[0])
            top = ax.secondary_xaxis("top", functions=(lambda m, r=rate: m * r / 1e6, lambda t, r=rate: t * 1e6 / r))
            top.set_xlabel("training tokens (M)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
