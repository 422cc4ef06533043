"""PNG grids of images, for people to look at: originals above reconstructions, samples per prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(img: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] or uint8 -> PIL RGB."""
    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


def image_grid(rows: list[list[Image.Image | torch.Tensor]], scale: int = 1, pad: int = 2) -> Image.Image:
    """Rows of images (PIL or tensors) laid out on a mid-grey canvas, each cell upscaled by `scale`."""
    rows = [[im if isinstance(im, Image.Image) else to_pil(im) for im in row] for row in rows if row]
    cw = max(im.width for row in rows for im in row) * scale
    ch = max(im.height for row in rows for im in row) * scale
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (128, 128, 128))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST),
                         (pad + j * (cw + pad), pad + i * (ch + pad)))
    return canvas


def save_grid(rows, path: str | Path, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale=scale).save(path)
    return path


def images_to_uint8(batch: torch.Tensor) -> np.ndarray:
    return (batch.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_labelled(items: list[tuple[Image.Image, str]], path: str | Path, scale: int = 2, text_width: int = 420) -> Path:
    """One row per (image, text): the image upscaled, the text beside it (wrapped), on white."""
    from PIL import ImageDraw
    import textwrap

    if not items:
        raise ValueError("nothing to draw")
    side = max(max(im.width, im.height) for im, _ in items) * scale
    row_h = max(side, 14 * 3) + 4
    canvas = Image.new("RGB", (side + text_width + 12, row_h * len(items) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (im, text) in enumerate(items):
        im = im.convert("RGB")
        canvas.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST), (4, 4 + i * row_h))
        lines = [w for part in text.split("\n") for w in textwrap.wrap(part, width=max(10, text_width // 7))]
        lines = lines[: max(1, row_h // 13)]
        draw.multiline_text((side + 10, 4 + i * row_h), "\n".join(lines), fill=(0, 0, 0), spacing=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
