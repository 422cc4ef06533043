"""A real image corpus nobody here drew: the colour emoji of Debian's fonts-noto-color-emoji.

    python -m data.emoji --out artifacts/emoji [--font PATH]

Renders every single-code-point emoji the font has (transparent RGBA PNGs, as found in the wild),
captions each with its Unicode name, writes an image folder + captions.jsonl, then converts a
train/test split of it (every 8th emoji held out) into img2dataset-style shards with data.convert.
Without --font, the font is taken from the Debian package (`apt-get download`, no root needed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.convert import convert

PACKAGE = "fonts-noto-color-emoji"
FONT_NAME = "NotoColorEmoji.ttf"
RANGES = [(0x2190, 0x21FF), (0x2300, 0x23FF), (0x2460, 0x27BF), (0x2900, 0x297F), (0x2B00, 0x2BFF),
          (0x1F000, 0x1F2FF), (0x1F300, 0x1FAFF)]


def fetch_font(cache: Path) -> Path:
    """The font file from the Debian package, downloaded and unpacked into `cache` once."""
    found = list(cache.rglob(FONT_NAME))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise SystemExit(f"error: could not download {PACKAGE} with apt-get ({detail.decode(errors='replace').strip()[:200] or e}); "
                             f"pass --font PATH/{FONT_NAME}")
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return next(cache.rglob(FONT_NAME))


def render_emoji(font: ImageFont.FreeTypeFont, ch: str, size: int = 136) -> Image.Image:
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((size // 2, size // 2), ch, font=font, embedded_color=True, anchor="mm")
    return img


def emoji_corpus(font_path: Path, out: Path, test_every: int = 8, limit: int | None = None) -> list[dict]:
    """Render every emoji with a glyph of its own (the first `limit`) into out/{train,test}/; returns the rows."""
    font = ImageFont.truetype(str(font_path), 109)  # the size the CBDT bitmaps are stored at
    missing = np.asarray(render_emoji(font, "\ue000"))  # what a code point without a glyph looks like
    rows = []
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name:
                continue
            img = render_emoji(font, ch)
            arr = np.asarray(img)
            if arr[..., 3].max() == 0 or np.array_equal(arr, missing):
                continue
            if limit is not None and len(rows) >= limit:
                return rows
            split = "test" if len(rows) % test_every == 0 else "train"
            (out / split).mkdir(parents=True, exist_ok=True)
            img.save(out / split / f"u{cp:05x}.png")
            rows.append({"file": f"u{cp:05x}.png", "caption": name.lower(), "codepoint": f"U+{cp:04X}", "split": split})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.emoji", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/emoji"))
    ap.add_argument("--font", type=Path, default=None, help="NotoColorEmoji.ttf (default: from the Debian package)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N emoji (tests)")
    args = ap.parse_args(argv)
    font = args.font or fetch_font(args.out / "font")
    corpus = args.out / "corpus"
    rows = emoji_corpus(font, corpus, limit=args.limit)
    for split in ("train", "test"):
        caps = corpus / f"captions_{split}.jsonl"
        caps.write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == split))
        report = convert(corpus / split, caps, args.out / "shards" / split, shard_size=500, progress=False)
        print(f"{split}: {report['written']} emoji -> {args.out / 'shards' / split} (skipped {report['skipped']})")
    print(f"{len(rows)} emoji rendered from {font}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
