"""Turn an image folder + a captions file into img2dataset-style shards.

    python -m data.convert --images DIR --captions captions.jsonl|.csv --out DIR [--shard-size 1000]

The captions file maps file names (relative to --images) to captions: JSON lines with a file key
(`file`, `image`, `path` or `filename`) and a caption key (`caption`, `text`, `txt`), or a CSV with a
header naming such columns. Image bytes are copied as they are (no re-encoding, nothing lost);
each image is test-decoded first and unusable ones are skipped and counted by reason. Images with
no caption entry are kept (they still train a tokenizer) and counted as `caption_missing`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data.shards import IMAGE_EXTS, DecodePolicy, ShardError, ShardWriter, Skip, decode_image

FILE_KEYS = ("file", "image", "path", "filename", "url")
CAPTION_KEYS = ("caption", "text", "txt")


def _pick(row: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return str(row[k])
    return None


def read_captions(path: Path, problems: Counter) -> dict[str, str]:
    """File name -> caption. Unreadable lines are counted, not fatal."""
    if not path.is_file():
        raise ShardError(f"captions file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        problems["captions_file_not_utf8"] += 1
    out: dict[str, str] = {}
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(row if isinstance(row, dict) else {})
            except json.JSONDecodeError:
                problems["caption_line_unparseable"] += 1
    elif path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        if rows and _pick(rows[0], FILE_KEYS) is None:
            raise ShardError(f"{path}: no file column; expected a header with one of {FILE_KEYS}")
    else:
        raise ShardError(f"{path}: captions must be .jsonl or .csv, got {path.suffix or 'no extension'}")
    for row in rows:
        f, c = _pick(row, FILE_KEYS), _pick(row, CAPTION_KEYS)
        if f is None:
            problems["caption_line_without_file"] += 1
            continue
        out[os.path.normpath(f)] = c if c is not None else ""
    return out


def convert(images: Path, captions: Path | None, out: Path, shard_size: int = 1000,
            policy: DecodePolicy | None = None, progress: bool = True) -> dict:
    if not images.is_dir():
        raise ShardError(f"image folder {images} does not exist")
    policy = policy or DecodePolicy()
    counts: Counter = Counter()
    caps = read_captions(captions, counts) if captions else {}
    files = sorted(str(p.relative_to(images)) for p in images.rglob("*")
                   if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if set(caps) - set(files):
        counts["captioned_file_not_found"] += len(set(caps) - set(files))
    written = 0
    with ShardWriter(str(out), shard_size=shard_size) as w:
        for rel in tqdm(files, unit=" images", disable=not progress, file=sys.stderr, mininterval=1.0):
            data = (images / rel).read_bytes()
            try:
                img = decode_image(data, policy, Counter())
            except Skip as s:
                counts[s.reason] += 1
                continue
            ext = Path(rel).suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            sample = {ext: data, "meta": {"source": rel, "width": img.width, "height": img.height}}
            caption = caps.get(os.path.normpath(rel))
            if caption is None:
                counts["caption_missing"] += 1
            else:
                sample["caption"] = caption
                sample["meta"]["caption"] = caption
            w.write(sample)
            written += 1
    return {"written": written, "images_found": len(files), "captions": len(caps), "shards": len(w.written),
            "out": str(out), "skipped": dict(sorted(counts.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--captions", type=Path, default=None)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = convert(args.images, args.captions, args.out, args.shard_size, progress=not args.quiet)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report['written']} of {report['images_found']} images into {report['shards']} shards at {args.out}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
