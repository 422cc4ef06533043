"""The tokenizer's figures for README.md: `python -m tokenizer.bench [--parts speed,shapes,emoji]`.

  speed   shard reading rate (decoded samples/s) and encode rate (images/s), medians of repeats
  shapes  train the default tokenizer for 10 minutes on the shapes world; PSNR/SSIM/usage on test and holdout
  emoji   render the Noto colour emoji, train 20 minutes on them; PSNR/SSIM/usage on held-out emoji,
          and the shapes tokenizer on the same held-out emoji
Targets (issue 2): PSNR >= 30 dB and code usage >= 80 % on held-out shapes after <= 10 minutes.
Writes bench/tokenizer.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.runtime import cpu_matmul_peaks, write_json
from data.stats import shard_stats
from tokenizer.checkpoint import load_tokenizer
from tokenizer.evaluate import evaluate_tokenizer, image_batches

PY = sys.executable


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([PY, "-m", *args], check=True)


def speed(shards: str, tokenizer_dir: str | None, repeats: int = 3) -> dict:
    reads = [shard_stats(shards, max_samples=3000, progress=False)["samples_per_s"] for _ in range(repeats)]
    out = {"read_samples_per_s_median": statistics.median(reads), "read_samples_per_s": reads}
    if tokenizer_dir:
        model = load_tokenizer(tokenizer_dir)
        from data.shards import ReadStats

        x = next(image_batches(shards, model.cfg.resolution, 256, ReadStats())).float() / 255
        rates = {}
        for bs in (1, 64, 256):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                for i in range(0, 256, bs):
                    model.encode(x[i:i + bs])
                times.append(time.perf_counter() - t)
            rates[f"batch_{bs}"] = round(256 / statistics.median(times), 1)
        out["encode_images_per_s"] = rates
        out["threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenizer.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="speed,shapes,emoji")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--shapes-minutes", type=float, default=10)
    ap.add_argument("--emoji-minutes", type=float, default=20)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    report: dict = {"cpu_matmul_gflops": cpu_matmul_peaks()}
    runs = args.out / "runs"
    shapes_tok = runs / "shapes" / "tokenizer"
    if "shapes" in parts:
        run("data.build")
        run("tokenizer.train", f"run_dir={runs / 'shapes'}", f"train.time_budget_min={args.shapes_minutes}",
            "trainer.max_steps=1000000", "trainer.val_check_interval=2000")
        report["shapes"] = {s: evaluate_tokenizer(shapes_tok, f"artifacts/shapes/{s}", runs / "shapes", name=s)
                            for s in ("test", "holdout")}
        report["shapes"]["train"] = json.loads((runs / "shapes" / "metrics.json").read_text())
    if "emoji" in parts:
        run("data.emoji", "--out", "artifacts/emoji")
        run("tokenizer.train", "data=folder", "data.train=artifacts/emoji/shards/train",
            "data.val=artifacts/emoji/shards/test", f"run_dir={runs / 'emoji'}",
            f"train.time_budget_min={args.emoji_minutes}", "trainer.max_steps=1000000",
            "trainer.val_check_interval=2000")
        emoji_test = "artifacts/emoji/shards/test"
        report["emoji"] = {"emoji_tokenizer": evaluate_tokenizer(runs / "emoji" / "tokenizer", emoji_test,
                                                                 runs / "emoji", name="emoji_test")}
        if shapes_tok.exists():
            report["emoji"]["shapes_tokenizer"] = evaluate_tokenizer(shapes_tok, emoji_test, runs / "shapes",
                                                                     name="emoji_test")
    if "speed" in parts:
        report["speed"] = speed("artifacts/shapes/val", str(shapes_tok) if shapes_tok.exists() else None)
    prev = json.loads((args.out / "tokenizer.json").read_text()) if (args.out / "tokenizer.json").exists() else {}
    write_json(args.out / "tokenizer.json", {**prev, **report})
    print(json.dumps(report, indent=2, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
