"""Read any img2dataset-style shards and report what is in them: `python -m data.stats 'SHARD_PATTERN'`.

Human-readable lines first; the last line is one JSON object with at least `read` (samples decoded),
`skipped` (reason -> count), `normalised` (reason -> count), the image-size range and the read rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from tqdm import tqdm

from data.shards import DecodePolicy, ReadStats, ShardError, expand_shards, iter_samples


def shard_stats(pattern: str, max_samples: int | None = None, progress: bool = True) -> dict:
    urls = expand_shards(pattern)
    stats = ReadStats()
    widths, heights, caption_chars = Counter(), Counter(), []
    t0 = time.perf_counter()
    bar = tqdm(total=max_samples, unit=" samples", disable=not progress, file=sys.stderr, mininterval=1.0)
    for s in iter_samples(urls, DecodePolicy(), stats):
        w, h = s["image"].size
        widths[w] += 1
        heights[h] += 1
        caption_chars.append(len(s["caption"]))
        bar.update(1)
        if max_samples and stats.read >= max_samples:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    out = stats.to_json()
    out.update({
        "pattern": pattern,
        "shards_matched": len(urls),
        "width_range": [min(widths), max(widths)] if widths else None,
        "height_range": [min(heights), max(heights)] if heights else None,
        "caption_chars_mean": round(sum(caption_chars) / len(caption_chars), 1) if caption_chars else 0,
        "seconds": round(elapsed, 3),
        "samples_per_s": round((stats.read + out["skipped_total"]) / max(elapsed, 1e-9), 1),
    })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.stats", description=__doc__.splitlines()[0])
    ap.add_argument("pattern", help="brace pattern, glob, directory, or several joined by '::'")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after this many decoded samples")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        out = shard_stats(args.pattern, args.max_samples, progress=not args.quiet)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in out["skipped"].items()) or "none"
    normalised = ", ".join(f"{k}={v}" for k, v in out["normalised"].items()) or "none"
    print(f"shards read: {out['shards']} of {out['shards_matched']} matched; samples decoded: {out['read']}")
    print(f"skipped: {skipped}")
    print(f"normalised: {normalised}")
    print(f"image width {out['width_range']}, height {out['height_range']}; mean caption {out['caption_chars_mean']} chars")
    print(f"rate: {out['samples_per_s']} samples/s over {out['seconds']} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
