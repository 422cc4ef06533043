"""The main job: `python -m fusion.demo [experiment=NAME]` (what `make demo` runs: experiment=shapes_demo).

data -> tokenizer -> code shards -> decoder -> (contrastive scorer) -> evaluation -> samples, as one recipe from
conf/experiment/NAME.yaml: shapes_demo (the embedded shapes world), emoji (a real corpus), folder_128 and
folder_256 (your own img2dataset-style shards). The preset's configs are composed and checked before anything
trains. Each stage is the command a user would type (printed as it runs); a stage whose output exists is
skipped, so an interrupted demo continues where it stopped. Ends with one table: tokenizer quality, reading
(VQA per question type, captions), writing (the judge per prompt type, or retrieval), speeds, and the PNGs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from data.runtime import UserError

PY = sys.executable
CONF = Path(__file__).resolve().parent.parent / "conf"
PRESET_KEYS = ("out", "root", "build", "built", "data", "tokenizer", "tokenizer_steps", "decoder", "decoder_steps",
               "tower_steps", "evaluate", "prompts")


def stage(name: str, done: Path, module: str, *args: str) -> float:
    if done.exists():
        print(f"== {name}: done before ({done})", flush=True)
        return 0.0
    print(f"== {name}: python -m {module} {' '.join(args)}", flush=True)
    t = time.time()
    subprocess.run([PY, "-m", module, *args], check=True)
    return time.time() - t


def load_preset(name: str) -> dict:
    """conf/experiment/NAME.yaml as a plain dict (one file per recipe: data, tokenizer, decoder, budgets)."""
    from omegaconf import OmegaConf

    path = CONF / "experiment" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
        raise UserError(f"no experiment preset {name!r}; known: {', '.join(known)}")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [k for k in PRESET_KEYS if k not in preset]
    if missing:
        raise UserError(f"experiment preset {path} lacks {', '.join(missing)}")
    return preset


def fill(items, **values) -> list[str]:
    """The preset's words with {root} and {out} filled in (other braces, Hydra dicts, are left alone)."""
    out = []
    for x in items or []:
        x = str(x)
        for k, v in values.items():
            x = x.replace("{" + k + "}", str(v))
        out.append(x)
    return out


def composed(config_name: str, overrides: list[str]):
    """The config a stage will run with (Hydra compose): a typo or a bad value fails here, before any training."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def check_preset(name: str, data: list[str], tokenizer: list[str], decoder: list[str]) -> dict:
    """Compose the tokenizer's and the decoder's configs and check that they fit together; one line if not."""
    from omegaconf import OmegaConf

    from tokenizer.model import TokenizerConfig

    try:
        tcfg = composed("train_tokenizer", [*data, *tokenizer])
        dcfg = composed("train_fusion", ["codes=unused", *data, *decoder])
    except Exception as e:  # Hydra's own messages are long; the first line names the bad override
        raise UserError(f"experiment {name}: {str(e).splitlines()[0]}") from None
    try:
        tok = TokenizerConfig(**{k: v for k, v in OmegaConf.to_container(tcfg.tokenizer, resolve=True).items()
                                 if k in TokenizerConfig.__dataclass_fields__})
    except ValueError as e:
        raise UserError(f"experiment {name}: {e} (set data.resolution or tokenizer.channels so it is)") from None
    span = tok.grid * tok.grid + 2 + (tok.grid if dcfg.layout.row_separator else 0)
    if dcfg.seq_len < span + 8:
        raise UserError(f"experiment {name}: seq_len {dcfg.seq_len} cannot hold one image ({span} tokens at "
                        f"{tok.grid} x {tok.grid} codes) and a caption; set seq_len >= {span + 64}")
    return {"tokenizer": tcfg, "decoder": dcfg, "grid": tok.grid, "num_codes": tok.num_codes, "span": span}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.demo", description=__doc__.splitlines()[0],
                                 epilog="experiment=NAME picks conf/experiment/NAME.yaml (default shapes_demo); "
                                        "other KEY=VALUE words are data overrides every stage gets, e.g. "
                                        "'data.train=\"shards/mine/{00000..00008}.tar\"' data.val=shards/mine/00009.tar")
    ap.add_argument("overrides", nargs="*", help="experiment=NAME and data overrides (KEY=VALUE)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: the preset's)")
    ap.add_argument("--data", type=Path, default=None, help="where the preset's shards are built (default: the preset's)")
    ap.add_argument("--tokenizer-steps", type=int, default=None, help="tokenizer training budget (steps)")
    ap.add_argument("--decoder-steps", type=int, default=None, help="decoder training budget (steps)")
    ap.add_argument("--tower-steps", type=int, default=None, help="contrastive model budget (steps; 0: none)")
    ap.add_argument("--decoder-min", type=float, default=None,
                    help="train the decoder for this many minutes instead of --decoder-steps (wall clock: "
                         "the figures then vary with the machine)")
    ap.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra fusion.evaluate override (repeatable), e.g. --eval generation.per_type=8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    words = dict(w.split("=", 1) for w in args.overrides if w.startswith("experiment="))
    bad = [w for w in args.overrides if "=" not in w]
    if bad:
        raise UserError(f"not a KEY=VALUE override: {bad[0]!r}")
    name = words.get("experiment", "shapes_demo")
    user_data = [w for w in args.overrides if not w.startswith("experiment=")]
    preset = load_preset(name)
    out = args.out or Path(preset["out"])
    root = args.data or (Path(preset["root"]) if preset["root"] else None)
    values = {"root": root, "out": out}
    data = fill(preset["data"], **values) + user_data
    if not preset["build"] and not any(w.startswith("data.train=") for w in data):
        raise UserError(f"experiment {name} reads your shards: add 'data.train=\"DIR/{{00000..00008}}.tar\"' "
                        "data.val=DIR/00009.tar (a folder or a glob will do too)")
    tok_over, dec_over = fill(preset["tokenizer"], **values), fill(preset["decoder"], **values)
    plan = check_preset(name, data, tok_over, dec_over)
    print(f"== experiment {name}: {plan['grid']} x {plan['grid']} codes of {plan['num_codes']} per image, "
          f"{plan['span']} tokens per image span, seq_len {plan['decoder'].seq_len}; everything in {out}/", flush=True)
    tok, codes, dec, ev, smp, tower = (out / "tokenizer", out / "codes", out / "decoder", out / "evaluation",
                                       out / "samples", out / "tower")
    t0, times = time.time(), {}
    if preset["build"]:
        build = fill(preset["build"], **values)
        times["data"] = stage("data", Path(fill([preset["built"]], **values)[0]), build[0], *build[1:])
    tok_steps = args.tokenizer_steps if args.tokenizer_steps is not None else preset["tokenizer_steps"]
    times["tokenizer"] = stage("tokenizer", tok / "tokenizer" / "config.json", "tokenizer.train", *data, *tok_over,
                               f"run_dir={tok}", "train.time_budget_min=null", f"trainer.max_steps={tok_steps}",
                               f"seed={args.seed}", "resume=auto")
    times["tokenizer_eval"] = stage("tokenizer evaluation", tok / "test_metrics.json", "tokenizer.evaluate",
                                    f"tokenizer_dir={tok / 'tokenizer'}", *data, f"run_dir={tok}", "split=test")
    times["codes"] = stage("code shards", codes / "_report.json", "tokenizer.pretokenize",
                           f"tokenizer_dir={tok / 'tokenizer'}", *data, f"out={codes}")
    dec_steps = args.decoder_steps if args.decoder_steps is not None else preset["decoder_steps"]
    budget = ([f"train.time_budget_min={args.decoder_min}", "trainer.max_steps=1000000"] if args.decoder_min
              else [f"trainer.max_steps={dec_steps}"])
    times["decoder"] = stage("decoder", dec / "model" / "decoder.json", "fusion.train", f"codes={codes}", *data,
                             *dec_over, f"run_dir={dec}", *budget, f"seed={args.seed}", "resume=auto")
    tower_steps = args.tower_steps if args.tower_steps is not None else preset["tower_steps"]
    retrieval = []
    if tower_steps:
        times["tower"] = stage("contrastive model (retrieval scores)", tower / "tower_summary.json",
                               "fusion.pretrain_tower", *data, f"run_dir={tower}", f"trainer.max_steps={tower_steps}",
                               f"trainer.val_check_interval={min(500, tower_steps)}", f"seed={args.seed}")
        retrieval = [f"retrieval.tower_run={tower}"]
    times["evaluation"] = stage("evaluation", ev / "evaluation.json", "fusion.evaluate", f"model_dir={dec / 'model'}",
                                f"codes={codes}", *data, *fill(preset["evaluate"], **values), *retrieval, *args.eval,
                                f"run_dir={ev}")
    if preset["prompts"]:
        quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in preset["prompts"])
        times["samples"] = stage("samples", smp / "samples.json", "fusion.sample", f"model_dir={dec / 'model'}",
                                 f"run_dir={smp}", "n=4", f"prompts=[{quoted}]")
    print_summary(name, out, tok, dec, ev, smp, times, time.time() - t0)
    return 0


def print_summary(name: str, out: Path, tok: Path, dec: Path, ev: Path, smp: Path, times: dict, total: float) -> None:
    from fusion.evaluate import summary_table
    from tokenizer.evaluate import sharing_and_ceiling

    tm = json.loads((tok / "test_metrics.json").read_text())
    train = json.loads((dec / "train_summary.json").read_text())
    report = json.loads((ev / "evaluation.json").read_text())
    codes = f"tokenizer codes       H(code | its patch's pixels) {tm['code_given_patch_nats']:.2f} nats"
    if tm.get("codes_per_flat_patch"):
        codes += "  codes per flat colour " + ", ".join(str(n) for n in tm["codes_per_flat_patch"].values())
    codes += sharing_and_ceiling(tm)
    pictures = [report.get("generation", {}).get("grid") if report.get("generation") else report.get("generation_grid"),
                str(smp / "grid.png") if (smp / "grid.png").exists() else None,
                str(dec / "samples" / "latest.png"), str(tok / "test_reconstructions.png")]
    lines = [
        "", "=" * 100, f"{name} summary (held-out test images)",
        f"tokenizer (test)      PSNR {tm['psnr']:.2f} dB  SSIM {tm['ssim']:.3f}  code usage {tm['code_usage']:.0%}  "
        f"({tm['tokens_per_image']} tokens per image)",
        codes,
        summary_table(report),
        f"decoder training      {train['steps']} steps, {train['tokens_per_s']:.0f} tokens/s, {train['precision']}"
        f"{', compiled' if train.get('compiled') else ''}, "
        f"{train['non_embedding_params'] / 1e6:.1f}M non-embedding parameters",
        f"wall time             " + "  ".join(f"{k} {v / 60:.1f} min" for k, v in times.items() if v) + f"  | total {total / 60:.1f} min",
        "pictures              " + ", ".join(p for p in pictures if p),
        f"everything            {out}/  (each stage's resolved config.yaml beside its outputs)",
        "=" * 100,
    ]
    print("\n".join(lines))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
