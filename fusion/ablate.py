"""Fusion vs adapter: `python -m fusion.ablate` runs both arms over seeds and writes the report.

Both arms get the same vocabulary, decoder size and initialisation (same seed), the same shards in
the same order, and a budget matched by a stated rule: the same training tokens, or the same
measured FLOPs (the adapter's tower forward included). Each run is its own process and folder.
`python -m fusion.ablate collect=DIR` only collects finished run folders (e.g. a Hydra multirun:
`python -m fusion.train -m arm=fusion,adapter seed=0,1,2 ...`) into the report.

Report: ablation.md / ablation.csv / ablation.json (per arm: mean +- std over seeds, winner per
column with the number of seeds it won) and val_text_ce_vs_flops.png.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from data.runtime import UserError, cli, run_dir_of, save_resolved_config, write_json

PY = sys.executable
# column -> (how to read it from a run, True if higher is better)
COLUMNS: dict[str, tuple] = {
    "vqa_all": (lambda e, s: e["vqa_test"]["accuracy"], True),
    **{f"vqa_{k}": ((lambda k: lambda e, s: e["vqa_test"]["per_type"].get(k))(k), True)
       for k in ("colour", "shape", "count", "position", "text")},
    "vqa_holdout": (lambda e, s: (e.get("vqa_holdout") or {}).get("accuracy"), True),
    "caption_ce": (lambda e, s: e["caption_test"]["ce"], False),
    "caption_ppl": (lambda e, s: e["caption_test"]["perplexity"], False),
    "text_only_ce": (lambda e, s: e["text_only_test"]["ce"], False),
    "generation_judge": (lambda e, s: (e.get("generation") or {}).get("pass_rate"), True),
    "params_total": (lambda e, s: s["params"] + s.get("image_encoder_params", 0), None),
    "params_trainable": (lambda e, s: s["trainable_params"], None),
    "train_flops": (lambda e, s: s["train_flops"], None),
    "samples_seen": (lambda e, s: s["data"]["read"], None),
    "train_flops_per_sample": (lambda e, s: s["train_flops"] / s["data"]["read"], None),
    "wall_s": (lambda e, s: s["seconds"], None),
    "tokens_per_s": (lambda e, s: s["tokens_per_s"], True),
}


def run(module: str, *args: str) -> None:
    print("$ python -m", module, " ".join(args), flush=True)
    subprocess.run([PY, "-m", module, *args], check=True)


def flops_per_step(summary: dict, images_per_step: float) -> float:
    tokens = summary["tokens"] / max(1, summary["steps"])
    return tokens * summary["flops_per_token"] + images_per_step * summary.get("flops_per_image", 0.0)


def collect(run_dirs: list[Path], out: Path, eval_args: list[str]) -> dict:
    """Evaluate where needed, then tabulate, compare and plot the runs."""
    rows = []
    for d in sorted(run_dirs):
        if not (d / "model" / "decoder.json").is_file():
            continue
        if not (d / "evaluation" / "evaluation.json").is_file():
            run("fusion.evaluate", f"model_dir={d / 'model'}", f"run_dir={d / 'evaluation'}", *eval_args)
        ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
        summary = json.loads((d / "train_summary.json").read_text())
        cfg = OmegaConf.load(d / "config.yaml")
        row = {"run": str(d), "arm": cfg["arm"], "seed": cfg["seed"]}
        for name, (get, _) in COLUMNS.items():
            try:
                row[name] = get(ev, summary)
            except (KeyError, TypeError):
                row[name] = None
        row["curve"] = val_curve(d, summary)
        rows.append(row)
    if not rows:
        raise UserError(f"no finished runs (model/decoder.json) among {len(run_dirs)} folders")
    arms = sorted({r["arm"] for r in rows})
    table = {arm: {} for arm in arms}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        for name in COLUMNS:
            vals = [r[name] for r in mine if r[name] is not None]
            table[arm][name] = {"mean": statistics.fmean(vals) if vals else None,
                                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    winners = compare(rows, arms)
    report = {"arms": table, "winners": winners, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}
    write_json(out / "ablation.json", report)
    write_tables(table, winners, rows, out)
    plot(rows, out / "val_text_ce_vs_flops.png")
    return report


def val_curve(d: Path, summary: dict) -> list[tuple[float, float]]:
    """(training FLOPs, val/text_ce) at each validation, from the run's CSV log."""
    path = d / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    per_step = summary["train_flops"] / max(1, summary["steps"])
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/text_ce"):
                out.append((float(row["step"]) * per_step, float(row["val/text_ce"])))
    return out


def compare(rows: list[dict], arms: list[str]) -> dict:
    """Per column: the arm with the better mean, and in how many paired seeds it was better."""
    if len(arms) != 2:
        return {}
    a, b = arms
    winners = {}
    for name, (_, higher) in COLUMNS.items():
        if higher is None:
            continue
        by_seed = {}
        for r in rows:
            if r[name] is not None:
                by_seed.setdefault(r["seed"], {})[r["arm"]] = r[name]
        pairs = [(v[a], v[b]) for v in by_seed.values() if a in v and b in v]
        if not pairs:
            only = {r["arm"] for r in rows if r[name] is not None}
            winners[name] = {"winner": next(iter(only)) if len(only) == 1 else None, "note": "only one arm measures this"}
            continue
        better_a = sum((x > y) if higher else (x < y) for x, y in pairs)
        better_b = sum((y > x) if higher else (y < x) for x, y in pairs)
        mean_a, mean_b = statistics.fmean(x for x, _ in pairs), statistics.fmean(y for _, y in pairs)
        if mean_a == mean_b:
            winners[name] = {"winner": "tie", "seeds_won": f"0/{len(pairs)}", "difference": 0.0}
            continue
        win = a if ((mean_a > mean_b) if higher else (mean_a < mean_b)) else b
        winners[name] = {"winner": win, "seeds_won": f"{better_a if win == a else better_b}/{len(pairs)}",
                         "difference": abs(mean_a - mean_b)}
    return winners


def fmt(v: dict) -> str:
    if v["mean"] is None:
        return "n/a"
    m, s = v["mean"], v["std"]
    if abs(m) >= 1e5:
        return f"{m:.3g}"
    return f"{m:.3f} ± {s:.3f}" if v["n"] > 1 else f"{m:.3f}"


def write_tables(table: dict, winners: dict, rows: list[dict], out: Path) -> None:
    arms = list(table)
    lines = ["| measure | " + " | ".join(arms) + " | winner (seeds won) |", "|---" * (len(arms) + 2) + "|"]
    for name in COLUMNS:
        w = winners.get(name, {})
        verdict = f"{w['winner']} ({w['seeds_won']})" if w.get("seeds_won") else (
            f"{w['winner']} ({w['note']})" if w.get("winner") else "")
        lines.append(f"| {name} | " + " | ".join(fmt(table[a][name]) for a in arms) + f" | {verdict} |")
    n = {a: table[a]["vqa_all"]["n"] for a in arms}
    lines.append("")
    lines.append(f"Seeds per arm: {n}. Values are mean ± std over seeds. 'generation_judge' is n/a for the adapter: "
                 "the baseline reads images but cannot write them.")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    with (out / "ablation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "arm", "seed", *COLUMNS])
        for r in rows:
            w.writerow([r["run"], r["arm"], r["seed"], *(r[c] for c in COLUMNS)])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours = {"fusion": "tab:blue", "adapter": "tab:orange"}
    for r in rows:
        if r["curve"]:
            x, y = zip(*r["curve"])
            ax.plot(x, y, marker="o", color=colours.get(r["arm"], "grey"), alpha=0.8,
                    label=f"{r['arm']} seed {r['seed']}")
    ax.set_xlabel("training FLOPs (measured, tower forward included)")
    ax.set_ylabel("validation text cross-entropy")
    ax.set_title("early fusion vs adapter")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="ablate")
@cli
def main(cfg: DictConfig):
    out = run_dir_of(cfg)
    save_resolved_config(cfg, out)
    codes = Path(cfg.codes)
    eval_args = [f"codes={codes}", f"data.root={cfg.data.root}", *cfg.eval_overrides]
    if cfg.collect:
        dirs = [p for p in Path(cfg.collect).iterdir() if p.is_dir()]
        report = collect(dirs, out, eval_args)
    else:
        shared = [f"codes={codes}", f"data.root={cfg.data.root}", f"seq_len={cfg.seq_len}",
                  f"train.batch_size={cfg.batch_size}", *cfg.train_overrides]
        vocab_dir, tower_dir = out / "shared" / "vocab", out / "shared" / "tower" / "tower"
        if not (tower_dir / "config.json").is_file():
            run("fusion.pretrain_tower", f"data.root={cfg.data.root}", f"run_dir={out / 'shared' / 'tower'}",
                *cfg.tower_overrides)
        steps = cfg.budget.tokens // (cfg.batch_size * cfg.seq_len)
        budget = [f"trainer.max_steps={steps}"]
        if cfg.budget.match == "flops":  # both stop at the FLOPs early fusion spends on its tokens
            flops = steps * cfg.batch_size * cfg.seq_len * decoder_flops_per_token(cfg)
            budget = [f"train.flops_budget={flops:.6g}", f"trainer.max_steps={4 * steps}"]
        elif cfg.budget.match != "tokens":
            raise UserError(f"budget.match must be tokens or flops, got {cfg.budget.match!r}")
        dirs = []
        for seed in cfg.seeds:
            for arm in ("fusion", "adapter"):
                d = out / f"{arm}_seed{seed}"
                dirs.append(d)
                if (d / "model" / "decoder.json").is_file():
                    continue
                extra = [f"vocab_dir={vocab_dir}"] if vocab_dir.is_dir() else []
                run("fusion.train", *shared, *extra, *budget, f"arm={arm}", f"seed={seed}", f"run_dir={d}",
                    f"tower.pretrained={tower_dir}", f"trainer.val_check_interval={max(1, steps // cfg.val_points)}")
                if not vocab_dir.is_dir():
                    (vocab_dir.parent).mkdir(parents=True, exist_ok=True)
                    import shutil

                    shutil.copytree(d / "vocab", vocab_dir)
        report = collect(dirs, out, eval_args)
    print((out / "ablation.md").read_text())
    print(f"-> {out}")
    return report


def decoder_flops_per_token(cfg: DictConfig) -> float:
    from fusion.decoder import DecoderConfig

    train_cfg = hydra.compose(config_name="train_fusion", overrides=[f"seq_len={cfg.seq_len}", *cfg.train_overrides,
                                                                     "codes=unused"])
    return DecoderConfig.from_dict(OmegaConf.to_container(train_cfg.decoder, resolve=True)).flops_per_token(cfg.seq_len)


if __name__ == "__main__":
    main()
