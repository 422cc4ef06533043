"""Two-node figure for README.md: `python -m fusion.scaling --codes runs/demo/codes [--steps 150]`.

Trains the decoder twice with the same global batch, seed and step count:
  one   one process, batch 2
  two   two 'nodes' on this machine (NODE_RANK 0 and 1, gloo on 127.0.0.1), batch 1 each
and compares their training-loss curves (the ranks read disjoint shards, so the curves agree within
noise, not bit for bit) and throughput. Both share one vocabulary so the losses are comparable.
Writes bench/scaling.json and bench/scaling.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from data.runtime import UserError, cli, write_json

PY = sys.executable


def losses(run: Path) -> dict[int, float]:
    out = {}
    with (run / "logs" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--runs", type=Path, default=Path("bench/runs/scaling"))
    args = ap.parse_args(argv)
    if not (args.codes / "train").is_dir():
        raise UserError(f"no code shards at {args.codes}/train (run tokenizer.pretokenize first)")
    common = [f"codes={args.codes}", f"trainer.max_steps={args.steps}", "trainer.precision=32-true",
              "trainer.val_check_interval=100000", "trainer.log_every_n_steps=5", "samples.count=0", "seed=0"]
    one, two = args.runs / "one", args.runs / "two"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    print(f"== one process, batch 2, {args.steps} steps", flush=True)
    subprocess.run([PY, "-m", "fusion.train", *common, f"run_dir={one}", "train.batch_size=2"], check=True, env=env)
    print("== two nodes (NODE_RANK 0 and 1), batch 1 each", flush=True)
    env2 = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "fusion.train", *common, f"run_dir={two}", "train.batch_size=1", f"vocab_dir={one / 'vocab'}",
           "trainer=multinode", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
           "trainer.ddp_timeout_s=120"]
    procs = [subprocess.Popen(cmd, env={**env2, "NODE_RANK": str(r)}) for r in (0, 1)]
    if any(p.wait() for p in procs):
        raise UserError("the two-node run failed (see its output above)")
    import json

    a, b = losses(one), losses(two)
    steps = sorted(set(a) & set(b))
    tail = steps[len(steps) // 2:]  # the second half: past the warm-up transient
    sa, sb = (json.loads((d / "train_summary.json").read_text()) for d in (one, two))
    report = {
        "steps": args.steps, "global_batch": 2,
        "loss_second_half_mean": {"one_process": statistics.fmean(a[s] for s in tail),
                                  "two_nodes": statistics.fmean(b[s] for s in tail)},
        "loss_second_half_std": {"one_process": statistics.stdev(a[s] for s in tail),
                                 "two_nodes": statistics.stdev(b[s] for s in tail)},
        "tokens_per_s": {"one_process": sa["tokens_per_s"], "two_nodes": sb["tokens_per_s"]},
        "scaling": round(sb["tokens_per_s"] / sa["tokens_per_s"], 3),
        "note": "two processes on one 2-core machine, one thread each, gloo over loopback: this measures "
                "correctness and overhead, not the speed-up real nodes would give",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "scaling.json", report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [a[s] for s in steps], label=f"one process, batch 2 ({sa['tokens_per_s']:.0f} tok/s)")
    ax.plot(steps, [b[s] for s in steps], label=f"two nodes, batch 1 each ({sb['tokens_per_s']:.0f} tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "scaling.png", dpi=120)
    print(json.dumps(report, indent=1))
    print(f"-> {args.out / 'scaling.json'}, {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main)(None))
