"""The learning-efficiency study: `python -m fusion.study codes=DIR` trains each variant of the recipe at the
same budget over seeds, evaluates every run, and writes one table and one set of curves.

A variant is a list of Hydra overrides of `fusion.train` (conf/study.yaml holds the study's variants; a
variant may bring its own `codes=` from another image tokenizer). Every run is its own process and folder,
`{out}/{variant}/seed{s}`; a finished run is not run again, so an interrupted study continues. Budgets are
training steps by default (`steps`), the same for every variant; a variant whose steps cost more (a larger
model, another optimiser) can say `train.time_budget_min=M` instead, and the table's tokens/s and wall time
show what each run got. `collect=DIR` tabulates finished run folders of that layout without training.

Writes study.md / study.csv / study.json (per variant: mean and spread over seeds of the judge per prompt
type and attribute, VQA per question type, caption gain, tokens/s) and study_curves.png (each variant's
learning curves, from the runs' curves.json).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from data.runtime import UserError, cli, run_dir_of, save_resolved_config, write_json
from fusion.ablate import run

# column -> how to read it from (evaluation.json, train_summary.json)
COLUMNS: dict[str, object] = {
    "judge_single": lambda e, s: e["generation"]["per_type"]["single"],
    "judge_all": lambda e, s: e["generation"]["pass_rate"],
    **{f"judge_{a}": (lambda a: lambda e, s: e["generation"]["attributes"].get(a))(a)
       for a in ("colour", "shape", "count", "cell")},
    "vqa_all": lambda e, s: e["vqa_test"]["accuracy"],
    **{f"vqa_{k}": (lambda k: lambda e, s: e["vqa_test"]["per_type"].get(k))(k)
       for k in ("colour", "shape", "count", "position", "text")},
    "caption_gain": lambda e, s: e["caption_gain_test"]["gain_vs_empty"],
    "gain_fraction": lambda e, s: e["caption_gain_test"]["gain_vs_empty"] / e["caption_gain_test"]["bound"],  # no bound: None
    "gain_vs_other": lambda e, s: e["caption_gain_test"]["gain"],
    "caption_ppl": lambda e, s: e["caption_test"]["perplexity"],
    "steps": lambda e, s: s["steps"],
    "tokens_per_s": lambda e, s: s["tokens_per_s"],
    "train_min": lambda e, s: s["seconds"] / 60,
}
PERCENT = {k for k in COLUMNS if k.startswith(("judge", "vqa")) or k == "gain_fraction"}


def merge_overrides(*lists: list[str]) -> list[str]:
    """Overrides in order, a later `key=value` replacing an earlier one of the same key (Hydra refuses twice)."""
    out: dict[str, str] = {}
    for items in lists:
        for o in items:
            out[o.split("=", 1)[0].lstrip("+~")] = o
    return list(out.values())


def run_variant(name: str, overrides: list[str], seed: int, out: Path, cfg: DictConfig) -> Path:
    d = out / name / f"seed{seed}"
    train = merge_overrides([f"codes={cfg.codes}", f"data.root={cfg.data.root}", f"trainer.max_steps={cfg.steps}"],
                            list(cfg.common), overrides, [f"seed={seed}", f"run_dir={d}", "resume=auto"])
    if not (d / "model" / "decoder.json").is_file():
        run("fusion.train", *train)
    if not (d / "evaluation" / "evaluation.json").is_file():
        codes = next(o.split("=", 1)[1] for o in reversed(train) if o.startswith("codes="))
        run("fusion.evaluate", f"model_dir={d / 'model'}", f"run_dir={d / 'evaluation'}", f"codes={codes}",
            f"data.root={cfg.data.root}", f"seed={seed}", *cfg.eval_overrides)
    return d


def read_run(d: Path) -> dict:
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    summary = json.loads((d / "train_summary.json").read_text())
    row = {}
    for name, get in COLUMNS.items():
        try:
            row[name] = get(ev, summary)
        except (KeyError, TypeError):
            row[name] = None
    curves = d / "curves.json"
    row["curve"] = json.loads(curves.read_text()) if curves.is_file() else []
    for p in row["curve"]:  # curves written before the gain vs the empty caption was logged held only the other
        if "caption_gain_vs_other" not in p and "caption_gain" in p:
            p["caption_gain_vs_other"] = p.pop("caption_gain")
    return row


def collect(out: Path, variants: list[str] | None = None) -> dict:
    """Every finished `{variant}/seed{s}` under `out`, tabulated per variant (in the given order)."""
    found = sorted(p.parent.parent for p in out.glob("*/seed*/evaluation/evaluation.json"))
    by_variant: dict[str, list[tuple[int, dict]]] = {}
    for d in found:
        by_variant.setdefault(d.parent.name, []).append((int(d.name.removeprefix("seed")), read_run(d)))
    if not by_variant:
        raise UserError(f"no finished runs ({{variant}}/seed{{s}}/evaluation/evaluation.json) under {out}")
    order = [v for v in (variants or []) if v in by_variant] + sorted(set(by_variant) - set(variants or []))
    table = {}
    for v in order:
        runs = [r for _, r in sorted(by_variant[v], key=lambda x: x[0])]
        table[v] = {"seeds": [s for s, _ in sorted(by_variant[v], key=lambda x: x[0])]}
        for c in COLUMNS:
            vals = [r[c] for r in runs if r[c] is not None]
            table[v][c] = {"mean": statistics.fmean(vals) if vals else None, "values": vals}
    write_json(out / "study.json", {"variants": table})
    write_tables(table, out)
    plot_study({v: [r["curve"] for _, r in by_variant[v]] for v in order}, out / "study_curves.png")
    return table


def fmt(c: str, cell: dict) -> str:
    if cell["mean"] is None:
        return "n/a"
    vals = cell["values"]
    if c in PERCENT:
        spread = f" ({'/'.join(f'{x:.0%}' for x in vals)})" if len(vals) > 1 else ""
        return f"{cell['mean']:.0%}{spread}"
    spread = f" ({'/'.join(f'{x:.3g}' for x in vals)})" if len(vals) > 1 else ""
    return f"{cell['mean']:.3g}{spread}"


def write_tables(table: dict, out: Path) -> None:
    cols = list(COLUMNS)
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for v, row in table.items():
        lines.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(fmt(c, row[c]) for c in cols) + " |")
    lines += ["", "Each cell: the mean over seeds, then each seed's value in brackets. judge_* and vqa_* are the test "
              "split's pass rate / accuracy; caption_gain is nats per image against the empty caption (gain_fraction: of the world's bound), gain_vs_other "
              "against another scene's caption."]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    with (out / "study.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed_index", *cols])
        for v, row in table.items():
            for i in range(len(row["seeds"])):
                w.writerow([v, row["seeds"][i], *((row[c]["values"][i] if i < len(row[c]["values"]) else None)
                                                  for c in cols)])


def plot_study(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Per measure, one line per variant and seed, against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("judge_single", "judge, single object"), ("judge_all", "judge, all prompt types"),
                ("vqa_colour", "VQA colour"), ("vqa_shape", "VQA shape"), ("vqa_count", "VQA count"),
                ("vqa_position", "VQA position"), ("caption_gain_vs_other", "caption gain vs another's caption (nats)")]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, measures):
        for i, (variant, runs) in enumerate(curves.items()):
            for j, points in enumerate(runs):
                pts = [(p["step"], p[key]) for p in points if p.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colours[i % len(colours)], alpha=0.9 if j == 0 else 0.5,
                            ls="-" if j == 0 else "--", label=variant if j == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        if not key.startswith("caption_gain"):
            ax.set_ylim(-0.02, 1.02)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9, title="variant (solid: first seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="study")
@cli
def main(cfg: DictConfig):
    out = run_dir_of(cfg)
    save_resolved_config(cfg, out)
    variants = OmegaConf.to_container(cfg.variants, resolve=True)
    only = list(cfg.only) if cfg.get("only") else list(variants)
    unknown = [v for v in only if v not in variants]
    if unknown:
        raise UserError(f"unknown variants {unknown}; conf/study.yaml has {list(variants)}")
    if not cfg.collect_only:
        for name in only:
            for seed in cfg.seeds:
                run_variant(name, list(variants[name] or []), seed, out, cfg)
    collect(out, only)
    print((out / "study.md").read_text())
    print(f"-> {out}/study.md, {out}/study_curves.png")


if __name__ == "__main__":
    main()
