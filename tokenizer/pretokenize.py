"""Image shards -> code shards, once, so decoder training never runs the image encoder.

    python -m tokenizer.pretokenize tokenizer_dir=runs/.../tokenizer out=artifacts/codes [splits=[train,val]]

For each split, each input shard `NNNNN.tar` becomes `{out}/{split}/NNNNN.tar` holding, per sample,
`{key}.codes.npy` (uint16 [h, w]) plus the caption `.txt` and `.json` carried along unchanged.
Shards are processed by parallel workers and written atomically, so a second run skips finished
shards (resume). `{out}/_tokenizer.json` names the tokenizer; codes from another one are refused.
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from data.loader import ImageTransform
from data.runtime import UserError, cli, run_dir_of, save_resolved_config, write_json
from data.shards import DecodePolicy, ReadStats, expand_shards, iter_samples, tar_writer
from tokenizer.checkpoint import load_tokenizer, read_tokenizer_meta

TOKENIZER_META = "_tokenizer.json"
_MODEL = None  # one tokenizer per worker process


def _model(tokenizer_dir: str):
    global _MODEL
    if _MODEL is None:
        torch.set_num_threads(1)  # parallelism comes from the worker processes
        _MODEL = load_tokenizer(tokenizer_dir)
    return _MODEL


def codes_to_bytes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes.astype(np.uint16), allow_pickle=False)
    return buf.getvalue()


def codes_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_shard(job: tuple[str, str, str, int]) -> dict:
    """One input shard -> one code shard; returns its ReadStats as JSON."""
    url, out_path, tokenizer_dir, batch_size = job
    model = _model(tokenizer_dir)
    transform = ImageTransform(model.cfg.resolution)
    stats, pending = ReadStats(), []
    tmp = out_path + ".tmp"

    def flush(writer):
        x = torch.stack([transform(s["image"]) for s in pending]).float() / 255
        codes = model.encode(x).numpy()
        for s, c in zip(pending, codes):
            rec = {"__key__": s["key"], "codes.npy": codes_to_bytes(c), "txt": s["caption"].encode("utf-8"),
                   "json": json.dumps(s["meta"], separators=(",", ":")).encode("utf-8")}
            writer.write(rec)
        pending.clear()

    with tar_writer(tmp) as writer:
        for s in iter_samples([url], DecodePolicy(draft_size=model.cfg.resolution * 2), stats):
            pending.append(s)
            if len(pending) == batch_size:
                flush(writer)
        if pending:
            flush(writer)
    os.replace(tmp, out_path)
    return stats.to_json()


def check_tokenizer_meta(out: Path, tokenizer_dir: str) -> dict:
    meta = read_tokenizer_meta(tokenizer_dir)
    want = {"fingerprint": meta["fingerprint"], "grid": meta["grid"], "num_codes": meta["num_codes"],
            "resolution": meta["config"]["resolution"],
            "tokenizer_dir": str(Path(tokenizer_dir).resolve())}  # absolute: training may run from elsewhere
    path = out / TOKENIZER_META
    if path.exists():
        have = json.loads(path.read_text())
        if have.get("fingerprint") != want["fingerprint"]:
            raise UserError(f"{out} holds codes from tokenizer {have.get('fingerprint')} "
                            f"({have.get('tokenizer_dir')}), not {want['fingerprint']}: use another out folder")
    else:
        write_json(path, want)
    return want


def pretokenize(tokenizer_dir: str, splits: dict[str, str], out: Path, workers: int = 2, batch_size: int = 64) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    meta = check_tokenizer_meta(out, tokenizer_dir)
    report: dict = {"tokenizer": meta, "splits": {}}
    for split, pattern in splits.items():
        urls = expand_shards(pattern)
        names = [Path(u).name for u in urls]
        if len(set(names)) != len(names):
            raise UserError(f"split {split!r}: shard file names repeat across folders in {pattern!r}")
        (out / split).mkdir(exist_ok=True)
        jobs = [(u, str(out / split / Path(u).name), str(tokenizer_dir), batch_size)
                for u in urls if not (out / split / Path(u).name).exists()]
        stats, t0 = ReadStats(), time.time()
        if jobs:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for s in tqdm(pool.map(encode_shard, jobs), total=len(jobs), desc=f"{split}", unit="shard"):
                    stats.merge(s)
        elapsed = time.time() - t0
        report["splits"][split] = {**stats.to_json(), "shards_total": len(urls), "shards_done_before": len(urls) - len(jobs),
                                   "seconds": round(elapsed, 1),
                                   "images_per_s": round(stats.read / elapsed, 1) if stats.read else None}
    write_json(out / "_report.json", report)
    return report


@hydra.main(version_base=None, config_path="../conf", config_name="pretokenize")
@cli
def main(cfg: DictConfig):
    out = Path(cfg.out)
    save_resolved_config(cfg, run_dir_of(cfg))
    splits = {s: cfg.data[s] for s in cfg.splits if cfg.data.get(s)}
    if not splits:
        raise UserError(f"none of the splits {list(cfg.splits)} is set in data config {cfg.data.name!r}")
    report = pretokenize(cfg.tokenizer_dir, splits, out, cfg.workers, cfg.batch_size)
    for split, r in report["splits"].items():
        skipped = sum(r["skipped"].values())
        print(f"{split}: {r['read']} images -> codes ({r['shards_done_before']} of {r['shards_total']} shards were "
              f"already done; {skipped} skipped) {r['images_per_s'] or '-'} images/s")
    print(f"code shards in {out}")
    return report


if __name__ == "__main__":
    main()
