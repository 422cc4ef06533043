"""A GenEval-style programmatic judge: parse a generated shapes-world image into objects and check it
against the scene its prompt asked for (presence, two objects, counting, position, held-out pairs)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from data.shapes import (COLOURS, SHAPES, Obj, Scene, WorldConfig, caption, count_phrase, draw_shape, plural,
                         position_name, render, sample_scene)

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
PALETTE_NAMES = tuple(COLOURS)
PROMPT_TYPES = ("single", "two", "counting", "position", "heldout")
# A bounding box wider than this fraction of a cell is large: halfway between small (0.5) and large (0.8).
LARGE_ABOVE = 0.65
SCAN_LIMIT = 100_000  # scenes make_prompts looks through for each prompt type before giving up


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    cx: float  # centroid in pixels
    cy: float
    area: int
    iou: float  # overlap with the best-fitting shape drawn into the blob's bounding box: a confidence


def as_array(image: Image.Image | np.ndarray, resolution: int | None = None) -> np.ndarray:
    """An HxWx3 uint8 array, resized to `resolution` if given and different."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got {image.dtype}")  # floats in [0, 1] would floor to 0
        image = Image.fromarray(np.ascontiguousarray(image))
    image = image.convert("RGB")
    if image.width != image.height or not 32 <= image.width <= 256:
        raise ValueError(f"expected a square image of 32..256 px, got {image.width}x{image.height}")
    if resolution is not None and image.width != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(image)


def border_background(img: np.ndarray) -> np.ndarray:
    """The most frequent border colour, binned so decoder noise does not split the vote."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    bins = (border // 32).astype(np.int64) @ np.array([64, 8, 1])
    return border[bins == np.bincount(bins).argmax()].mean(0)


def colour_labels(img: np.ndarray, max_distance: float) -> np.ndarray:
    """Per pixel, the index of the nearest palette colour, or -1 (background, ink, blurred edge, noise).

    The background competes too: a blurred edge half-way to the background is not part of the object.
    """
    pixels = img.reshape(-1, 3).astype(np.float32)
    references = np.concatenate([PALETTE, border_background(img)[None]])
    distances = np.linalg.norm(pixels[:, None] - references[None], axis=-1)
    nearest = distances.argmin(1)
    keep = (nearest < len(PALETTE)) & (distances.min(1) < max_distance)
    return np.where(keep, nearest, -1).reshape(img.shape[:2])


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels; each pixel gets its component's smallest flat index."""
    h, w = labels.shape
    none = h * w  # sentinel larger than every pixel index
    comp = np.where(labels >= 0, np.arange(none).reshape(h, w), none)
    same_down = (labels[1:] == labels[:-1]) & (labels[1:] >= 0)
    same_right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)
    while True:
        new = comp.copy()
        np.minimum(new[1:], np.where(same_down, comp[:-1], none), out=new[1:])
        np.minimum(new[:-1], np.where(same_down, comp[1:], none), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_right, comp[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_right, comp[:, 1:], none), out=new[:, :-1])
        # pointer jumping: follow each pixel's label to its label's label, so long shapes converge in few rounds
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, comp):
            return comp
        comp = new


# Sub-pixel placements tried for each shape: rasterising a 5-8 px shape depends on where it falls
# between pixel centres, so the judge redraws it the way the renderer would rather than scaling a template.
OFFSETS = (-0.5, -0.25, 0.0, 0.25, 0.5)


@lru_cache(maxsize=256)
def shape_candidates(shape: str, h: int, w: int) -> np.ndarray:
    """Masks [k, h+2, w+2] of `shape` drawn by the renderer around an h x w bounding box (1 px margin)."""
    side = max(h, w)
    masks = []
    # side + 2: a decoder rounds off a diamond's tips, shrinking its box by a pixel on each side
    for extent in (side - 1, side, side + 1, side + 2):
        for dx in OFFSETS:
            for dy in OFFSETS:
                img = Image.new("1", (w + 2, h + 2), 0)
                draw_shape(ImageDraw.Draw(img), shape, 1 + w / 2 + dx, 1 + h / 2 + dy, extent, 1)
                masks.append(np.asarray(img, dtype=bool))
    return np.stack(masks)


def best_shape(blob: np.ndarray) -> tuple[str, float]:
    """The shape that, drawn into the blob's bounding box, overlaps it best, and that IoU."""
    padded = np.pad(blob, 1)
    ious = {}
    for shape in SHAPES:
        candidates = shape_candidates(shape, *blob.shape)
        overlap = (candidates & padded).sum((1, 2)) / (candidates | padded).sum((1, 2))
        ious[shape] = float(overlap.max())
    shape = max(ious, key=ious.get)
    return shape, ious[shape]


def detect_objects(image: Image.Image | np.ndarray, resolution: int | None = None,
                   max_distance: float = 90.0, min_area_fraction: float = 0.25) -> list[Detected]:
    """The objects in an image of a scene of `resolution` px (the image is resized to it if it differs).

    An object is a 4-connected blob of one palette colour (pixels within `max_distance` in RGB) covering at
    least `min_area_fraction` of a small object's area; smaller blobs are decoder noise or blurred edges.
    """
    img = as_array(image, resolution)
    cell = img.shape[0] / 3
    min_area = min_area_fraction * round(cell * 0.5) ** 2
    labels = colour_labels(img, max_distance)
    comp = connected_components(labels)
    ids, areas = np.unique(comp[labels >= 0], return_counts=True)
    found = []
    for comp_id, area in zip(ids, areas):
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp == comp_id)
        y0, x0 = ys.min(), xs.min()
        blob = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
        blob[ys - y0, xs - x0] = True
        shape, iou = best_shape(blob)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        found.append(Detected(
            colour=PALETTE_NAMES[labels[ys[0], xs[0]]], shape=shape,
            size="large" if max(blob.shape) > LARGE_ABOVE * cell else "small",
            row=min(int(cy // cell), 2), col=min(int(cx // cell), 2),
            cx=round(float(cx), 2), cy=round(float(cy), 2), area=int(area), iou=round(iou, 3)))
    return found


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A generation prompt and what its image must show."""

    text: str
    type: str
    scene: Scene  # the scene the prompt was captioned from: a reference picture, not a requirement
    split: str
    index: int
    spec: dict  # what judge() checks: "present" [{colour, shape}], "count" {colour, shape, n}, "at" [{..., row, col}]


def _pair(o: Obj) -> dict:
    return {"colour": o.colour, "shape": o.shape}


def _spec_for(kind: str, scene: Scene, held: set[tuple[str, str]]) -> dict | None:
    """What a prompt of this kind checks in this scene, or None if the scene does not suit the kind."""
    objs, groups = scene.objects, Counter((o.colour, o.shape) for o in scene.objects)
    if scene.text is not None:
        return None  # prompts name objects only; words would add an unchecked demand
    if kind == "single" and len(objs) == 1:
        return {"present": [_pair(objs[0])]}
    if kind == "two" and len(objs) == 2 and len(groups) == 2:
        return {"present": [_pair(o) for o in objs]}
    if kind == "counting":
        many = [(pair, n) for pair, n in groups.items() if n >= 2]
        if len(many) == 1:
            (colour, shape), n = many[0]
            return {"count": {"colour": colour, "shape": shape, "n": n}}
    if kind == "position" and len(objs) <= 2 and len(groups) == len(objs):
        return {"at": [{**_pair(o), "row": o.row, "col": o.col} for o in objs]}
    if kind == "heldout" and len(objs) <= 2:
        return {"present": [_pair(o) for o in objs if (o.colour, o.shape) in held]}
    return None


def make_prompts(world: WorldConfig, split: str, n_per_type: int, seed: int = 0) -> list[Prompt]:
    """`n_per_type` prompts of each type, captioned in training phrasings from the first suitable scenes.

    Scenes are scanned from index `seed * 1_000_000` of `split` (of the `holdout` split for `heldout`).
    """
    held = set(world.heldout)
    template = {"single": 3, "two": 3, "counting": 3, "position": 0, "heldout": 3}
    prompts = []
    for kind in PROMPT_TYPES:
        kind_split = "holdout" if kind == "heldout" else split
        made = 0
        for index in range(seed * 1_000_000, seed * 1_000_000 + SCAN_LIMIT):
            if made == n_per_type:
                break
            scene = sample_scene(world, kind_split, index)
            spec = _spec_for(kind, scene, held)
            if spec is not None:
                text = caption(scene, random.Random(0), template=template[kind])
                prompts.append(Prompt(text, kind, scene, kind_split, index, spec))
                made += 1
        if made < n_per_type:
            raise ValueError(f"only {made} of {n_per_type} '{kind}' prompts fit the first {SCAN_LIMIT} "
                             f"{kind_split} scenes of this world")
    return prompts


# ---------------------------------------------------------------- judging


ATTRIBUTES = ("colour", "shape", "count", "cell")


def judge(image: Image.Image | np.ndarray, prompt: Prompt) -> dict:
    """{"pass": every check holds, "checks": {description: bool}, "attributes": {attribute: bool}} for one image.

    The attributes give partial credit, each asked on its own: every asked colour present (any shape), every
    asked shape present (any colour), the asked count right (of the counted pair for counting prompts, of
    objects in all for the others), every asked cell holding an object (any colour or shape).
    """
    detected = detect_objects(image, prompt.scene.resolution)
    found = Counter((d.colour, d.shape) for d in detected)
    placed = {(d.colour, d.shape, d.row, d.col) for d in detected}
    checks = {}
    for want in prompt.spec.get("present", []):
        checks[f"{want['colour']} {want['shape']} present"] = found[(want["colour"], want["shape"])] > 0
    if "count" in prompt.spec:
        want = prompt.spec["count"]
        checks[f"exactly {count_phrase(want['n'])} {want['colour']} {plural(want['shape'])}"] = \
            found[(want["colour"], want["shape"])] == want["n"]
    for want in prompt.spec.get("at", []):
        checks[f"{want['colour']} {want['shape']} at the {position_name(want['row'], want['col'])}"] = \
            (want["colour"], want["shape"], want["row"], want["col"]) in placed
    wants = prompt.spec.get("present", []) + prompt.spec.get("at", []) + (
        [prompt.spec["count"]] if "count" in prompt.spec else [])
    colours, shapes = {d.colour for d in detected}, {d.shape for d in detected}
    cells = {(d.row, d.col) for d in detected}
    attributes = {"colour": all(w["colour"] in colours for w in wants),
                  "shape": all(w["shape"] in shapes for w in wants)}
    if "count" in prompt.spec:
        want = prompt.spec["count"]
        attributes["count"] = found[(want["colour"], want["shape"])] == want["n"]
    elif prompt.type != "heldout":  # a held-out prompt's scene may hold objects its spec leaves out
        attributes["count"] = len(detected) == len(prompt.scene.objects)
    if "at" in prompt.spec:
        attributes["cell"] = all((w["row"], w["col"]) in cells for w in prompt.spec["at"])
    return {"pass": bool(checks) and all(checks.values()), "checks": checks, "attributes": attributes}


def score(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[Prompt]) -> dict:
    """Pass rate overall and per prompt type, with how many prompts each rate is over; and the rate of each
    attribute (colour, shape, count, cell) right, over the prompts that ask it, overall and per type."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    passed: dict[str, list[bool]] = defaultdict(list)
    attrs: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for image, prompt in zip(images, prompts):
        verdict = judge(image, prompt)
        passed[prompt.type].append(verdict["pass"])
        for a, ok in verdict["attributes"].items():
            attrs[prompt.type][a].append(ok)
    every = [p for results in passed.values() for p in results]
    rate = lambda xs: sum(xs) / len(xs)
    attribute_rates = {a: rate([x for t in attrs.values() for x in t.get(a, [])]) for a in ATTRIBUTES
                       if any(a in t for t in attrs.values())}
    return {"pass_rate": sum(every) / max(len(every), 1), "n": len(every),
            "per_type": {kind: rate(results) for kind, results in passed.items()},
            "n_per_type": {kind: len(results) for kind, results in passed.items()},
            "attributes": attribute_rates,
            "attributes_per_type": {kind: {a: rate(v) for a, v in d.items()} for kind, d in attrs.items()}}


def judge_roundtrip(roundtrip: Callable[[list[Image.Image]], list[Image.Image]], world: WorldConfig,
                    n_per_type: int, split: str = "test") -> dict:
    """The judge on `roundtrip(ground-truth renders)` of its own prompts' scenes: for an image tokenizer's
    encode-decode, the score a perfect decoder would reach with it (the tokenizer's ceiling)."""
    prompts = make_prompts(world, split, n_per_type)
    return score(roundtrip([render(p.scene) for p in prompts]), prompts)
