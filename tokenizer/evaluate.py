"""Evaluate a saved tokenizer on held-out shards: `python -m tokenizer.evaluate tokenizer_dir=... [split=test]`.

Writes {split}_metrics.json (PSNR, SSIM, code usage and perplexity, code determinism, encode speed; on the
shapes world also the ceiling: the judge on reconstructions of its prompts' scenes) and
{split}_reconstructions.png (originals above reconstructions).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from data.grid import save_grid, to_pil
from data.judge import judge_roundtrip
from data.loader import ImageTransform
from data.runtime import UserError, cli, run_dir_of, save_resolved_config, write_json
from data.shapes import WorldConfig, world_of
from data.shards import DecodePolicy, ReadStats, iter_samples
from tokenizer.checkpoint import load_tokenizer
from tokenizer.metrics import CodeDeterminism, CodeHistogram, psnr_per_image, ssim_per_image


def image_batches(pattern: str, resolution: int, batch_size: int, stats: ReadStats, max_images: int | None = None):
    """Decoded, resized uint8 image batches read in this process, in shard order."""
    transform, buf, n = ImageTransform(resolution), [], 0
    for s in iter_samples(pattern, DecodePolicy(draft_size=resolution * 2), stats):
        buf.append(transform(s["image"]))
        n += 1
        if len(buf) == batch_size or (max_images and n >= max_images):
            yield torch.stack(buf)
            buf = []
        if max_images and n >= max_images:
            return
    if buf:
        yield torch.stack(buf)


@torch.no_grad()
def roundtrip(model, images: list, batch_size: int = 64) -> list:
    """PIL images -> encode -> decode -> PIL images (in batches: the ceiling's 800 at once would hold GBs)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
                         for im in images[i:i + batch_size]]).float() / 255
        out += [to_pil(r) for r in model.decode(model.encode(x))]
    return out


@torch.no_grad()
def evaluate_tokenizer(tokenizer_dir, pattern: str, out_dir, batch_size: int = 64, name: str = "test",
                       max_images: int | None = None, world: WorldConfig | None = None,
                       ceiling_per_type: int = 160) -> dict:
    """Reconstruction and code metrics on `pattern`'s images; with a shapes `world`, also the judge's
    ceiling (`ceiling_per_type` prompts of each type, reconstructed)."""
    model = load_tokenizer(tokenizer_dir)
    out_dir = Path(out_dir)
    stats, hist, determinism = ReadStats(), CodeHistogram(model.cfg.num_codes), CodeDeterminism()
    psnr, ssim, show = [], [], None
    encode_s = 0.0
    for x in image_batches(pattern, model.cfg.resolution, batch_size, stats, max_images):
        pixels, x = x, x.float() / 255
        t = time.perf_counter()
        codes = model.encode(x)
        encode_s += time.perf_counter() - t
        determinism.update(pixels, codes)
        rec = model.decode(codes)
        psnr.append(psnr_per_image(rec, x))
        ssim.append(ssim_per_image(rec, x))
        hist.update(codes)
        if show is None:
            show = [list(x[:8]), list(rec[:8])]
    if not psnr:
        raise UserError(f"no readable images in {pattern!r} ({stats.summary()})")
    p = torch.cat(psnr)
    metrics = {
        "split": name, "images": len(p), "psnr": float(p.mean()), "psnr_median": float(p.median()),
        "ssim": float(torch.cat(ssim).mean()), "code_usage": hist.usage, "perplexity": hist.perplexity,
        "num_codes": model.cfg.num_codes, "tokens_per_image": model.cfg.grid ** 2,
        "encode_images_per_s": len(p) / max(encode_s, 1e-9), **determinism.result(), "data": stats.to_json(),
    }
    if world is not None and ceiling_per_type > 0:
        ceiling = judge_roundtrip(lambda ims: roundtrip(model, ims), world, ceiling_per_type)
        metrics["ceiling"] = {k: ceiling[k] for k in ("pass_rate", "per_type", "attributes", "n")}
    write_json(out_dir / f"{name}_metrics.json", metrics)
    save_grid(show, out_dir / f"{name}_reconstructions.png", scale=3)
    return metrics


def summary_line(m: dict) -> str:
    flat = ", ".join(f"{n}" for n in m["codes_per_flat_patch"].values())
    line = (f"{m['split']}: PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.3f}  usage {m['code_usage']:.1%}  "
            f"perplexity {m['perplexity']:.0f}  H(code|patch) {m['code_given_patch_nats']:.2f} nats  "
            f"codes per flat colour {flat}")
    return line + sharing_and_ceiling(m)


def sharing_and_ceiling(m: dict) -> str:
    """The shared-code share and the judge's ceiling of a metrics dict, as printed (empty where not measured)."""
    text = ""
    if "patches_on_a_shared_code" in m:
        text += f"  patches on another's code {m['patches_on_a_shared_code']:.1%}"
    if "ceiling" in m:
        text += f"  ceiling (judge on {m['ceiling']['n']} reconstructions) {m['ceiling']['pass_rate']:.1%}"
    return text


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate_tokenizer")
@cli
def main(cfg: DictConfig):
    run_dir = run_dir_of(cfg)
    save_resolved_config(cfg, run_dir)
    pattern = cfg.data.get(cfg.split)
    if not pattern:
        raise UserError(f"data config {cfg.data.name!r} has no split {cfg.split!r}")
    m = evaluate_tokenizer(cfg.tokenizer_dir, pattern, run_dir, cfg.batch_size, cfg.split, cfg.max_images,
                           world=world_of(cfg.data), ceiling_per_type=cfg.ceiling_per_type)
    print(summary_line(m) + f"  ({m['images']} images, {m['encode_images_per_s']:.0f} img/s encode) "
          f"-> {run_dir}/{cfg.split}_metrics.json")
    return m


if __name__ == "__main__":
    main()
