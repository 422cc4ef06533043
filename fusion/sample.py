"""Text-to-image-token sampling and interleaved generation: `python -m fusion.sample model_dir=RUN/model ...`.

    prompts='["A picture of a red circle."]' n=4 cfg_scale=3     text -> image, n samples per prompt
    interleave='["A picture of a blue square.", "<image>", "Q: How many objects are there? A:", "<text>"]'
                                                               text, image, text ... in one call

Writes PNGs, a grid (one row per prompt) and samples.json (prompt, seed, path, text) to the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from data.grid import save_grid, to_pil
from data.runtime import UserError, cli, inference_dtype, run_dir_of, save_resolved_config, write_json
from fusion.checkpoint import Bundle, load_bundle
from fusion.generate import Generator, SamplingConfig

IMAGE, TEXT = "<image>", "<text>"


def sampling_config(cfg: DictConfig, bundle: Bundle) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, cfg_scale=cfg.cfg_scale,
                          max_new_tokens=bundle.vocab.layout.span_len, use_cache=cfg.use_cache)


def codes_to_image(bundle: Bundle, span_tail: list[int]):
    codes = bundle.vocab.decode_image([bundle.vocab.boi, *span_tail])
    return to_pil(bundle.tokenizer.decode(torch.from_numpy(codes)[None])[0])


def text_to_images(bundle: Bundle, prompts: list[str], n: int, sc: SamplingConfig, seed: int, batch_size: int = 16):
    """n images per prompt; returns [(prompt, sample index, seed, PIL image)]."""
    v, gen = bundle.vocab, Generator(bundle.decoder, bundle.vocab)
    jobs = [(p, j) for p in prompts for j in range(n)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        ids = [[v.bos, *v.encode_text(p), v.boi] for p, _ in chunk]
        for (p, j), g in zip(chunk, gen.generate(ids, sc, seed=seed + i)):
            out.append((p, j, seed + i, codes_to_image(bundle, g)))
    return out


def interleaved(bundle: Bundle, parts: list[str], sc: SamplingConfig, seed: int) -> list:
    """Follow a script of text, <image> (draw one) and <text> (say one line) parts, in one context."""
    v, gen = bundle.vocab, Generator(bundle.decoder, bundle.vocab)
    context, out = [v.bos], []
    for k, part in enumerate(parts):
        if part == IMAGE:
            g = gen.generate([context + [v.boi]], sc, seed=seed + k)[0]
            context += [v.boi, *g]
            out.append(codes_to_image(bundle, g))
        elif part == TEXT:
            text_sc = SamplingConfig(temperature=0, allow_images=False, stop_at_newline=True, max_new_tokens=48)
            g = gen.generate([context], text_sc, seed=seed + k)[0]
            context += g
            out.append(v.decode_text(g).strip())
        else:
            context += v.encode_text(part)
            out.append(part)
    return out


@hydra.main(version_base=None, config_path="../conf", config_name="sample")
@cli
def main(cfg: DictConfig):
    out_dir = run_dir_of(cfg)
    save_resolved_config(cfg, out_dir)
    bundle = load_bundle(cfg.model_dir, dtype=inference_dtype(cfg.get("precision", "auto")))
    sc = sampling_config(cfg, bundle)
    if cfg.interleave:
        pieces = interleaved(bundle, list(cfg.interleave), sc, cfg.seed)
        record = []
        for k, p in enumerate(pieces):
            if isinstance(p, str):
                record.append({"text": p})
            else:
                path = out_dir / f"interleaved_{k:02d}.png"
                p.resize((p.width * 4, p.height * 4)).save(path)
                record.append({"image": str(path)})
        write_json(out_dir / "samples.json", record)
        for r in record:
            print(r["text"] if "text" in r else f"[image {r['image']}]")
        return record
    if not cfg.prompts:
        raise UserError("give prompts='[...]' (text to image) or interleave='[...]'")
    t = time.perf_counter()
    results = text_to_images(bundle, list(cfg.prompts), cfg.n, sc, cfg.seed)
    elapsed = time.perf_counter() - t
    record, rows = [], {}
    for i, (p, j, seed, img) in enumerate(results):
        path = out_dir / f"{list(cfg.prompts).index(p):03d}_{j}.png"
        img.save(path)
        rows.setdefault(p, []).append(img)
        record.append({"prompt": p, "sample": j, "seed": seed, "image": str(path)})
    grid = save_grid(list(rows.values()), out_dir / "grid.png", scale=3)
    write_json(out_dir / "samples.json", record)
    n_tokens = len(results) * bundle.vocab.layout.span_len
    print(f"{len(results)} images in {elapsed:.1f} s ({n_tokens / elapsed:.0f} image tokens/s); grid: {grid}")
    return record


if __name__ == "__main__":
    main()
