"""Write the shapes world as img2dataset-style shards: `python -m data.build [data.splits.train=N ...]`.

Each split goes to {root}/{split}/00000.tar ...; a manifest records the world config so a second
run with the same config is a no-op and a different config refuses to mix into the same folder.
Shards are rendered in parallel and each one is written atomically.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.grid import save_grid
from data.runtime import UserError, cli, save_resolved_config
from data.shapes import SPLITS, WorldConfig, make_sample
from data.shards import ShardWriter

MANIFEST = "_manifest.json"


def _write_shard(args) -> str:
    world_kw, split, shard, start, stop, out = args
    world = WorldConfig(**world_kw)
    with ShardWriter(out, shard_size=stop - start, start_shard=shard) as w:
        for i in range(start, stop):
            w.write(make_sample(world, split, i))
    return w.written[0]


def build_split(world: WorldConfig, split: str, n: int, out: Path, shard_size: int, workers: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    jobs, done = [], []
    world_kw = {k: getattr(world, k) for k in WorldConfig.__dataclass_fields__}
    for shard, start in enumerate(range(0, n, shard_size)):
        path = out / f"{shard:05d}.tar"
        if path.exists():  # complete shards are renamed into place, so an existing one is whole
            done.append(str(path))
            continue
        jobs.append((world_kw, split, shard, start, min(n, start + shard_size), str(out)))
    if jobs:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for path in tqdm(pool.map(_write_shard, jobs), total=len(jobs), desc=f"{split} shards", unit="shard"):
                done.append(path)
    return sorted(done)


def build(cfg: DictConfig) -> dict:
    root = Path(cfg.data.root)
    world = WorldConfig(**OmegaConf.to_container(cfg.data.world, resolve=True))
    splits = {k: int(v) for k, v in cfg.data.splits.items()}
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise UserError(f"unknown splits {sorted(unknown)}; the shapes world has {list(SPLITS)}")
    want = {"world": OmegaConf.to_container(cfg.data.world, resolve=True), "splits": splits,
            "shard_size": int(cfg.data.shard_size)}
    manifest = root / MANIFEST
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have == want:
            print(f"shapes world already built at {root} (delete it to rebuild)")
            return have
        raise UserError(f"{root} holds a shapes world built with another config; choose another data.root or delete it")
    root.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, root)
    for split, n in splits.items():
        build_split(world, split, n, root / split, int(cfg.data.shard_size), int(cfg.workers))
    preview = [[make_sample(world, s, i)["image"] for i in range(8)] for s in splits]
    save_grid(preview, root / "preview.png", scale=3)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(want, indent=2))
    os.replace(tmp, manifest)
    print(f"wrote {sum(splits.values())} scenes to {root} ({', '.join(f'{k}={v}' for k, v in splits.items())}); "
          f"preview: {root / 'preview.png'}")
    return want


@hydra.main(version_base=None, config_path="../conf", config_name="build_data")
@cli
def main(cfg: DictConfig):
    if cfg.data.name != "shapes":
        raise UserError("data.build generates the shapes world; for your own images use python -m data.convert")
    return build(cfg)


if __name__ == "__main__":
    main()
