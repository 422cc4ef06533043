"""Builders for the broken inputs real crawls contain; shared by the data and tokenizer tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import webdataset as wds
from PIL import Image


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def png_claiming_size(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels: what a decompression bomb looks like to a reader."""
    b = bytearray(png(Image.new("L", (1, 1))))
    struct.pack_into(">II", b, 16, w, h)  # IHDR data starts at byte 16
    struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    return bytes(b)


def sixteen_bit_png() -> bytes:
    arr = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    return png(Image.fromarray(arr))  # uint16 -> mode I;16


def rgba_png() -> bytes:
    img = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 20, 30))  # left half fully transparent
    return png(img)


GOOD = {"png": png(rgb()), "txt": b"a good caption", "json": b'{"ok": true}'}

# name -> (sample fields, expected outcome): ("skip", reason) or ("ok", normalisation note or None)
CASES: dict[str, tuple[dict, tuple[str, str | None]]] = {
    "good": (GOOD, ("ok", None)),
    "truncated_png": ({"png": png(rgb(seed=1))[:200], "txt": b"x"}, ("skip", "truncated_or_corrupt_image")),
    "not_an_image": ({"jpg": b"this is plain text, not a picture at all", "txt": b"x"}, ("skip", "not_an_image")),
    "html_as_jpg": ({"jpg": b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>", "txt": b"x"},
                    ("skip", "html_not_image")),
    "empty_file": ({"jpg": b"", "txt": b"x"}, ("skip", "empty_image_file")),
    "cmyk": ({"jpg": jpg(Image.new("CMYK", (40, 30), (0, 255, 255, 0))), "txt": b"x"}, ("ok", "cmyk_to_rgb")),
    "sixteen_bit": ({"png": sixteen_bit_png(), "txt": b"x"}, ("ok", "high_bit_depth_to_rgb")),
    "palette": ({"png": png(rgb(seed=2).convert("P")), "txt": b"x"}, ("ok", "palette_to_rgb")),
    "grayscale": ({"png": png(rgb(seed=3).convert("L")), "txt": b"x"}, ("ok", "grayscale_to_rgb")),
    "one_bit": ({"png": png(rgb(seed=4).convert("1")), "txt": b"x"}, ("ok", "grayscale_to_rgb")),
    "rgba": ({"png": rgba_png(), "txt": b"x"}, ("ok", "alpha_on_white")),
    "bomb_warned": ({"png": png_claiming_size(12_000, 12_000), "txt": b"x"}, ("skip", "too_many_pixels")),
    "bomb_refused": ({"png": png_claiming_size(30_000, 30_000), "txt": b"x"}, ("skip", "too_many_pixels")),
    "one_pixel": ({"png": png(Image.new("RGB", (1, 1))), "txt": b"x"}, ("skip", "too_small")),
    "no_image": ({"txt": b"only a caption"}, ("skip", "image_missing")),
    "caption_missing": ({"png": png(rgb(seed=5))}, ("ok", "caption_missing")),
    "caption_empty": ({"png": png(rgb(seed=6)), "txt": b"  \n "}, ("ok", "caption_empty")),
    "caption_latin1": ({"png": png(rgb(seed=7)), "txt": "caf\u00e9 cr\u00e8me".encode("latin-1")},
                       ("ok", "caption_not_utf8_recoded")),
    "caption_8kb": ({"png": png(rgb(seed=8)), "txt": ("word " * 1700).encode()}, ("ok", "caption_truncated")),
    "json_broken": ({"png": png(rgb(seed=9)), "txt": b"x", "json": b"{not json"}, ("ok", "json_invalid")),
}


def write_bad_shard(path, cases=CASES) -> dict[str, str]:
    """One shard holding every case in order; returns key -> case name."""
    keys = {}
    with wds.TarWriter(str(path)) as w:
        for i, (name, (fields, _)) in enumerate(cases.items()):
            key = f"{i:09d}"
            w.write({"__key__": key, **fields})
            keys[key] = name
    return keys


def write_truncated_shard(path, n: int = 10, keep_fraction: float = 0.55) -> int:
    """n good samples, then the file cut off mid-way; returns the byte length kept."""
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            w.write({"__key__": f"{i:09d}", "png": png(rgb(seed=100 + i)), "txt": f"caption {i}".encode()})
    data = open(path, "rb").read()
    cut = int(len(data) * keep_fraction)
    open(path, "wb").write(data[:cut])
    return cut
