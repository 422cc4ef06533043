"""Webdataset shards in img2dataset's layout: writing them, and reading any such shards robustly.

Layout: `00000.tar`, `00001.tar`, ...; per sample `{9-digit key}.png|jpg`, `.txt` (caption) and
`.json` (metadata). Reading never crashes on bad input and is never silent: every sample is
either decoded (possibly normalised, e.g. CMYK -> RGB) or skipped, and both are counted by reason
in a `ReadStats`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError
from webdataset.tariterators import tar_file_iterator

from data.runtime import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


class ShardError(UserError):
    """Input unusable as a whole (no shard matches, unwritable output); the message is one line."""


# ---------------------------------------------------------------- finding shards

def expand_shards(pattern: str | Iterable[str]) -> list[str]:
    """Shard paths from a brace pattern (`d/{00000..00009}.tar`), a glob, a directory, or a list.

    Several patterns may be joined with `::` (webdataset's convention).
    """
    patterns = pattern.split("::") if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for p in patterns:
        p = os.path.expanduser(str(p))
        if os.path.isdir(p):
            urls += sorted(glob.glob(os.path.join(p, "*.tar")))
            continue
        for q in braceexpand(p):
            hits = sorted(glob.glob(q)) if glob.has_magic(q) else ([q] if os.path.exists(q) else [])
            urls += hits
    if not urls:
        raise ShardError(f"no shard matches {pattern!r} (looked for files; cwd={os.getcwd()})")
    return urls


# ---------------------------------------------------------------- statistics

@dataclass
class ReadStats:
    """What a read saw: decoded samples, skipped ones and normalisations, by reason."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    normalised: Counter = field(default_factory=Counter)
    min_size: tuple[int, int] | None = None  # (width, height) of the smallest/largest image by area
    max_size: tuple[int, int] | None = None
    shards: int = 0

    def add_image_size(self, w: int, h: int):
        if self.min_size is None or w * h < self.min_size[0] * self.min_size[1]:
            self.min_size = (w, h)
        if self.max_size is None or w * h > self.max_size[0] * self.max_size[1]:
            self.max_size = (w, h)

    def merge(self, other: "ReadStats | dict") -> "ReadStats":
        o = other if isinstance(other, ReadStats) else ReadStats.from_json(other)
        self.read += o.read
        self.skipped.update(o.skipped)
        self.normalised.update(o.normalised)
        self.shards += o.shards
        for s in (o.min_size, o.max_size):
            if s:
                self.add_image_size(*s)
        return self

    def to_json(self) -> dict:
        return {
            "read": self.read,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "normalised": dict(sorted(self.normalised.items())),
            "shards": self.shards,
            "min_size": list(self.min_size) if self.min_size else None,
            "max_size": list(self.max_size) if self.max_size else None,
        }

    @staticmethod
    def from_json(d: dict) -> "ReadStats":
        return ReadStats(read=d.get("read", 0), skipped=Counter(d.get("skipped", {})),
                         normalised=Counter(d.get("normalised", {})), shards=d.get("shards", 0),
                         min_size=tuple(d["min_size"]) if d.get("min_size") else None,
                         max_size=tuple(d["max_size"]) if d.get("max_size") else None)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read {self.read} samples from {self.shards} shards; skipped: {skipped}"


# ---------------------------------------------------------------- decoding

@dataclass
class DecodePolicy:
    min_side: int = 8  # smaller images carry nothing a tokenizer can learn from (a 1x1 pixel)
    max_pixels: int = 64_000_000  # above this, refuse before decoding (decompression bombs)
    max_caption_chars: int = 1000  # longer captions are cut at a word boundary
    require_caption: bool = False  # skip samples with no usable caption (captioning/T2I data)
    require_image: bool = True
    draft_size: int | None = None  # JPEG: decode at reduced scale when only this size is needed


class Skip(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml")) or b"<html" in head


def decode_image(data: bytes, policy: DecodePolicy, notes: Counter) -> Image.Image:
    """Bytes -> RGB PIL image, or Skip. Records normalisations (mode conversions) in `notes`."""
    if not data:
        raise Skip("empty_image_file")
    if _looks_like_html(data):
        raise Skip("html_not_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise Skip("too_many_pixels")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Skip("not_an_image", str(e))
    w, h = img.size
    if w * h > policy.max_pixels:
        raise Skip("too_many_pixels", f"{w}x{h}")
    if min(w, h) < policy.min_side:
        raise Skip("too_small", f"{w}x{h}")
    if policy.draft_size and img.format == "JPEG":
        img.draft("RGB", (policy.draft_size, policy.draft_size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Skip("truncated_or_corrupt_image", str(e))
    return to_rgb(img, notes)


def to_rgb(img: Image.Image, notes: Counter) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            arr = arr / hi * 255.0
        notes["high_bit_depth_to_rgb"] += 1
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes["alpha_on_white"] += 1
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    notes[{"P": "palette_to_rgb", "L": "grayscale_to_rgb", "1": "grayscale_to_rgb",
           "CMYK": "cmyk_to_rgb"}.get(mode, f"{mode.lower()}_to_rgb")] += 1
    return img.convert("RGB")


def decode_caption(data: bytes | None, policy: DecodePolicy, notes: Counter) -> str:
    if data is None:
        if policy.require_caption:
            raise Skip("caption_missing")
        notes["caption_missing"] += 1
        return ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # the usual culprit in crawled captions
        notes["caption_not_utf8_recoded"] += 1
    text = " ".join(text.replace("\x00", " ").split())
    if not text:
        if policy.require_caption:
            raise Skip("caption_empty")
        notes["caption_empty"] += 1
        return ""
    if len(text) > policy.max_caption_chars:
        cut = text[: policy.max_caption_chars]
        text = cut[: cut.rfind(" ")] if " " in cut else cut
        notes["caption_truncated"] += 1
    return text


def decode_meta(data: bytes | None, notes: Counter) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return meta
    except (ValueError, UnicodeDecodeError):
        notes["json_invalid"] += 1
        return {}


def decode_sample(raw: dict, policy: DecodePolicy) -> dict:
    """A raw webdataset sample (bytes by extension) -> {key, image, caption, meta, notes}, or Skip."""
    notes: Counter = Counter()
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    image = None
    if ext is None:
        if policy.require_image:
            raise Skip("image_missing")
    else:
        image = decode_image(raw[ext], policy, notes)
    return {
        "key": raw["__key__"],
        "image": image,
        "caption": decode_caption(raw.get("txt"), policy, notes),
        "meta": decode_meta(raw.get("json"), notes),
        "notes": notes,
        "url": raw.get("__url__", ""),
    }


# ---------------------------------------------------------------- reading

def _tar_error_reason(e: Exception) -> str:
    if isinstance(e, (tarfile.ReadError, EOFError)) or "unexpected end" in str(e).lower():
        return "truncated_tar"
    if isinstance(e, FileNotFoundError):
        return "shard_missing"
    return "unreadable_tar"


def tar_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """Stage: {url} -> raw samples grouped by key, or {__skip__: reason} markers.

    Written instead of webdataset's tarfile_to_samples because its handlers cannot pass a
    shard-level failure (a tar cut off mid-file) downstream: here it becomes a counted marker,
    and the samples read before the cut are kept.
    """
    for src in urls:
        url = src["url"]
        current: dict | None = None
        try:
            with open(url, "rb") as f:
                for entry in tar_file_iterator(f):
                    fname = entry["fname"]
                    base = os.path.basename(fname)
                    if "." not in base:
                        continue
                    key, suffix = os.path.join(os.path.dirname(fname), base.split(".", 1)[0]), base.split(".", 1)[1].lower()
                    if current is not None and key != current["__key__"]:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    if suffix in current:
                        yield {"__skip__": "duplicate_file_in_sample", "__key__": key, "__url__": url}
                        continue
                    current[suffix] = entry["data"]
        except Exception as e:  # noqa: BLE001 - every shard failure is counted, none is fatal
            if current is not None:
                yield current
                current = None
            yield {"__skip__": _tar_error_reason(e), "__key__": "", "__url__": url, "__detail__": str(e)[:200]}
        if current is not None:
            yield current
        yield {"__shard_done__": url}


def decoded_samples(raws: Iterable[dict], policy: DecodePolicy) -> Iterator[dict]:
    """Stage: raw samples -> decoded samples, or {__skip__} markers (never raises)."""
    for raw in raws:
        if "__skip__" in raw or "__shard_done__" in raw:
            yield raw
            continue
        try:
            yield decode_sample(raw, policy)
        except Skip as s:
            yield {"__skip__": s.reason, "__key__": raw["__key__"], "__url__": raw.get("__url__", "")}


def account(stream: Iterable[dict], stats: ReadStats) -> Iterator[dict]:
    """Stage: count markers and notes into `stats`, pass on decoded samples only."""
    for s in stream:
        if "__shard_done__" in s:
            stats.shards += 1
        elif "__skip__" in s:
            stats.skipped[s["__skip__"]] += 1
        else:
            stats.read += 1
            stats.normalised.update(s["notes"])
            if s.get("image") is not None:
                stats.add_image_size(*s["image"].size)
            yield s


def iter_samples(pattern: str | list[str], policy: DecodePolicy | None = None,
                 stats: ReadStats | None = None) -> Iterator[dict]:
    """Read shards in this process, in order: decoded samples out, everything else counted."""
    urls = expand_shards(pattern)
    stats = stats if stats is not None else ReadStats()
    yield from account(decoded_samples(tar_samples({"url": u} for u in urls), policy or DecodePolicy()), stats)


# ---------------------------------------------------------------- writing

def tar_writer(path: str) -> wds.TarWriter:
    """webdataset's TarWriter with a whole-second mtime. Its default, time.time(), is a float, which Python's tarfile
    can only store in a PAX header of its own: one extra 1 KiB header per member (shapes shards 7.1 -> 4.0 MB for
    1,000 samples), parsed again on every read (the reader's header loop ~1.5x slower)."""
    return wds.TarWriter(path, mtime=int(time.time()))


class ShardWriter:
    """Writes img2dataset-layout shards: `{shard:05d}.tar`, keys `{shard:05d}{index:04d}`.

    Each shard is written to a temporary name and renamed when complete, so a reader never
    sees a half-written shard and an interrupted writer leaves only whole shards behind.
    """

    def __init__(self, out_dir: str, shard_size: int = 1000, start_shard: int = 0, image_ext: str = "png"):
        if shard_size > 10_000:
            raise ShardError(f"shard_size {shard_size} exceeds img2dataset's 4-digit sample index")
        self.out_dir, self.shard_size, self.image_ext = out_dir, shard_size, image_ext
        os.makedirs(out_dir, exist_ok=True)
        self.shard = start_shard
        self.count = 0
        self.written: list[str] = []
        self._tar: wds.TarWriter | None = None
        self._tmp = ""

    def _open(self):
        self._tmp = os.path.join(self.out_dir, f"{self.shard:05d}.tar.tmp")
        self._tar = tar_writer(self._tmp)

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            final = self._tmp[: -len(".tmp")]
            os.replace(self._tmp, final)
            self.written.append(final)
            self._tar = None
            self.shard += 1
            self.count = 0

    def write(self, sample: dict[str, Any]) -> str:
        """sample: {"image": PIL | bytes, "caption": str, "meta": dict} plus any extra `ext: bytes`."""
        if self._tar is None:
            self._open()
        key = f"{self.shard:05d}{self.count:04d}"
        rec: dict[str, Any] = {"__key__": key}
        for k, v in sample.items():
            if k == "image":
                rec[self.image_ext] = encode_image(v, self.image_ext) if isinstance(v, Image.Image) else v
            elif k == "caption":
                rec["txt"] = v.encode("utf-8")
            elif k == "meta":
                rec["json"] = json.dumps({"key": key, **v}, separators=(",", ":")).encode("utf-8")
            else:
                rec[k] = v
        self._tar.write(rec)
        self.count += 1
        if self.count >= self.shard_size:
            self._close()
        return key

    def close(self) -> list[str]:
        self._close()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # leave no half shard behind on failure
            self._tar.close()
            os.remove(self._tmp)


def encode_image(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


KEY_RE = re.compile(r"^\d{9}$")
