"""The main job on the embedded shapes world: `python -m fusion.demo` (what `make demo` runs).

shapes world -> tokenizer -> code shards -> decoder -> evaluation -> samples. Each stage is the command
a user would type (printed as it runs); a stage whose output exists is skipped, so an interrupted demo
continues where it stopped. Ends with one table: tokenizer quality, VQA accuracy per question type,
the judge's score per prompt type, speeds, and where the PNGs are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
# Budgets in steps, not minutes, so two runs on one machine give the same figures (wall time varies by machine).
TOKENIZER_STEPS = 3000
DECODER_STEPS = 2500


def stage(name: str, done: Path, module: str, *args: str) -> float:
    if done.exists():
        print(f"== {name}: done before ({done})", flush=True)
        return 0.0
    print(f"== {name}: python -m {module} {' '.join(args)}", flush=True)
    t = time.time()
    subprocess.run([PY, "-m", module, *args], check=True)
    return time.time() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--data", type=Path, default=Path("artifacts/shapes"))
    ap.add_argument("--tokenizer-steps", type=int, default=TOKENIZER_STEPS, help="tokenizer training budget (steps)")
    ap.add_argument("--decoder-steps", type=int, default=DECODER_STEPS, help="decoder training budget (steps)")
    ap.add_argument("--decoder-min", type=float, default=None,
                    help="train the decoder for this many minutes instead of --decoder-steps (wall clock: "
                         "the figures then vary with the machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out, data = args.out, args.data
    tok, codes, dec, ev, smp = out / "tokenizer", out / "codes", out / "decoder", out / "evaluation", out / "samples"
    t0, times = time.time(), {}
    times["data"] = stage("shapes world", data / "_manifest.json", "data.build", f"data.root={data}")
    times["tokenizer"] = stage("tokenizer", tok / "tokenizer" / "config.json", "tokenizer.train", f"data.root={data}",
                               f"run_dir={tok}", "train.time_budget_min=null", f"trainer.max_steps={args.tokenizer_steps}",
                               f"seed={args.seed}", "resume=auto")
    times["tokenizer_eval"] = stage("tokenizer evaluation", tok / "test_metrics.json", "tokenizer.evaluate",
                                    f"tokenizer_dir={tok / 'tokenizer'}", f"data.root={data}", f"run_dir={tok}", "split=test")
    times["codes"] = stage("code shards", codes / "_report.json", "tokenizer.pretokenize",
                           f"tokenizer_dir={tok / 'tokenizer'}", f"data.root={data}", f"out={codes}")
    budget = ([f"train.time_budget_min={args.decoder_min}", "trainer.max_steps=1000000"] if args.decoder_min
              else [f"trainer.max_steps={args.decoder_steps}"])
    times["decoder"] = stage("decoder", dec / "model" / "decoder.json", "fusion.train", f"codes={codes}",
                             f"data.root={data}", f"run_dir={dec}", *budget, f"seed={args.seed}", "resume=auto")
    times["evaluation"] = stage("evaluation", ev / "evaluation.json", "fusion.evaluate", f"model_dir={dec / 'model'}",
                                f"codes={codes}", f"data.root={data}", f"run_dir={ev}")
    times["samples"] = stage("samples", smp / "samples.json", "fusion.sample", f"model_dir={dec / 'model'}",
                             f"run_dir={smp}", "n=4", "prompts=['A picture of a red circle.','A picture of two blue squares.',"
                             "'A large yellow triangle at the top right on a white background.',"
                             "'Three objects on a black background: a green cross, a purple diamond and an orange square.']")
    print_summary(out, tok, dec, ev, smp, times, time.time() - t0)
    return 0


def print_summary(out: Path, tok: Path, dec: Path, ev: Path, smp: Path, times: dict, total: float) -> None:
    from fusion.evaluate import summary_table

    tm = json.loads((tok / "test_metrics.json").read_text())
    train = json.loads((dec / "train_summary.json").read_text())
    report = json.loads((ev / "evaluation.json").read_text())
    lines = [
        "", "=" * 100, "demo summary (held-out test scenes)",
        f"tokenizer (test)      PSNR {tm['psnr']:.2f} dB  SSIM {tm['ssim']:.3f}  code usage {tm['code_usage']:.0%}  "
        f"({tm['tokens_per_image']} tokens per image)",
        f"tokenizer codes       H(code | its patch's pixels) {tm['code_given_patch_nats']:.2f} nats  codes per flat colour "
        + ", ".join(str(n) for n in tm["codes_per_flat_patch"].values())
        + (f"  ceiling (judge on reconstructions) {tm['ceiling']['pass_rate']:.0%}" if "ceiling" in tm else ""),
        summary_table(report),
        f"decoder training      {train['steps']} steps, {train['tokens_per_s']:.0f} tokens/s, {train['precision']}, "
        f"{train['non_embedding_params'] / 1e6:.1f}M non-embedding parameters",
        f"wall time             " + "  ".join(f"{k} {v / 60:.1f} min" for k, v in times.items() if v) + f"  | total {total / 60:.1f} min",
        f"pictures              {report.get('generation', {}).get('grid')} (one row per prompt type)",
        f"                      {smp / 'grid.png'} (samples), {dec / 'samples' / 'latest.png'} (during training), "
        f"{tok / 'test_reconstructions.png'} (tokenizer)",
        f"everything            {out}/  (each stage's resolved config.yaml beside its outputs)",
        "=" * 100,
    ]
    print("\n".join(lines))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
