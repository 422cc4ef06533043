"""The shapes world: seeded procedural scenes with exact ground truth.

A scene is a plain background holding 1-6 objects (shape, colour, size) on a 3x3 grid of
nameable cells, and optionally one rendered word or digit in a cell of its own. Everything a
caption, a question or a judge needs is derived from the `Scene` dataclass, so the answer key
always matches the picture: the renderer draws exactly what the scene says, without
anti-aliasing, in exact palette colours.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

# Palette chosen for large pairwise RGB distances, so colour segmentation is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Backgrounds and ink stay outside the object palette, so a judge can ignore them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (170, 170, 170),
    "black": (20, 20, 20),
}
INK = {"white": (0, 0, 0), "grey": (0, 0, 0), "black": (255, 255, 255)}
# Words are kept to those that fit one grid cell at the configured resolution (see `words_for`).
WORDS: tuple[str, ...] = tuple("0123456789") + ("hi", "go", "up", "ok", "me", "we", "cat", "sun", "box", "dog")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "centre", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Colour+shape pairs that never occur in train/val/test and always occur in the `holdout`
# split: a measure of compositional generalisation (each colour and shape is still seen).
DEFAULT_HELDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "cross"),
                   ("yellow", "diamond"), ("purple", "square"))
SPLITS = ("train", "val", "test", "holdout")


def position_name(row: int, col: int) -> str:
    """'top left', 'middle right', ..., with the middle cell simply 'centre'."""
    if row == 1 and col == 1:
        return "centre"
    return f"{ROWS[row]} {COLS[col]}"


def plural(shape: str) -> str:
    return {"cross": "crosses"}.get(shape, shape + "s")


def count_phrase(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    cx: float  # centre in pixels
    cy: float
    extent: float  # side of the bounding box in pixels

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    def noun(self, with_size: bool = False) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Text:
    word: str
    row: int
    col: int
    cx: float
    cy: float
    font_px: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    resolution: int
    background: str
    objects: tuple[Obj, ...]
    text: Text | None = None

    def to_json(self) -> dict:
        return {
            "resolution": self.resolution,
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
            "text": asdict(self.text) if self.text else None,
        }

    @staticmethod
    def from_json(d: dict) -> "Scene":
        return Scene(
            resolution=int(d["resolution"]),
            background=d["background"],
            objects=tuple(Obj(**o) for o in d["objects"]),
            text=Text(**d["text"]) if d.get("text") else None,
        )

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape)
                   for o in self.objects)

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}


@dataclass
class WorldConfig:
    resolution: int = 48
    min_objects: int = 1
    max_objects: int = 6
    text_prob: float = 0.3
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    heldout: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT
    seed: int = 0

    def __post_init__(self):
        if not 32 <= self.resolution <= 256:
            raise ValueError(f"shapes world resolution must be in [32, 256], got {self.resolution}")
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {self.min_objects}..{self.max_objects}")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes in world config: {unknown}")
        self.colours, self.shapes = tuple(self.colours), tuple(self.shapes)
        self.heldout = tuple(tuple(p) for p in self.heldout)


def world_of(data_cfg) -> WorldConfig | None:
    """The shapes world a Hydra data config describes (its `world` node), or None for other data."""
    if data_cfg.get("name") != "shapes" or data_cfg.get("world") is None:
        return None
    from omegaconf import OmegaConf

    world = data_cfg.world
    return WorldConfig(**(OmegaConf.to_container(world, resolve=True) if OmegaConf.is_config(world) else dict(world)))


def scene_rng(cfg: WorldConfig, split: str, index: int) -> random.Random:
    """Every (seed, split, index) names one scene, independent of how many were made before."""
    digest = hashlib.sha256(f"{cfg.seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def font_px(resolution: int) -> int:
    return round(resolution / 3 * 0.75)


@lru_cache(maxsize=8)
def words_for(resolution: int) -> tuple[str, ...]:
    """The words whose rendering fits inside one cell (digits always do at >= 32 px)."""
    font, cell = _font(font_px(resolution)), resolution / 3
    fits = tuple(w for w in WORDS if font.getbbox(w)[2] <= cell - 2)
    return fits or tuple("0123456789")


def sample_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = scene_rng(cfg, split, index)
    res = cfg.resolution
    cell = res / 3
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    has_text = rng.random() < cfg.text_prob and n < 9
    cells = rng.sample(range(9), n + int(has_text))
    heldout = set(cfg.heldout)
    # the holdout split always contains a held-out pair; the others never do
    forced = rng.randrange(n) if split == "holdout" and heldout else -1
    objects = []
    for i, c in enumerate(cells[:n]):
        row, col = divmod(c, 3)
        if i == forced:
            colour, shape = rng.choice(sorted(heldout))
        else:
            while True:
                colour, shape = rng.choice(cfg.colours), rng.choice(cfg.shapes)
                if (colour, shape) not in heldout:
                    break
        size = rng.choice(SIZES)
        extent = round(cell * (0.8 if size == "large" else 0.5))
        slack = (cell - extent) / 2 - 1
        cx = cell * (col + 0.5) + rng.uniform(-slack, slack)
        cy = cell * (row + 0.5) + rng.uniform(-slack, slack)
        objects.append(Obj(shape, colour, size, row, col, round(cx, 2), round(cy, 2), extent))
    text = None
    if has_text:
        row, col = divmod(cells[n], 3)
        text = Text(rng.choice(words_for(res)), row, col, round(cell * (col + 0.5), 2), round(cell * (row + 0.5), 2),
                    font_px(res))
    return Scene(res, rng.choice(cfg.backgrounds), tuple(objects), text)


# ---------------------------------------------------------------- rendering

def shape_polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for polygonal shapes (None for the circle, drawn as an ellipse)."""
    h = extent / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        a = extent / 6  # arms one third of the extent wide
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, extent)
    if poly is None:
        h = extent / 2
        draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
    else:
        # PIL fills polygons inclusively; shrink the far edges by a pixel so a square of
        # extent e covers exactly e x e pixels.
        draw.polygon([(x - (x > cx), y - (y > cy)) for x, y in poly], fill=fill)


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # Pillow's bundled font: no system fonts needed


def render(scene: Scene) -> Image.Image:
    """Draw the scene in exact palette colours, without anti-aliasing."""
    img = Image.new("RGB", (scene.resolution, scene.resolution), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliased glyph edges: every pixel is background, ink or an object
    for o in scene.objects:
        draw_shape(draw, o.shape, o.cx, o.cy, o.extent, COLOURS[o.colour])
    if scene.text is not None:
        t = scene.text
        draw.text((t.cx, t.cy), t.word, fill=INK[scene.background], font=_font(t.font_px), anchor="mm")
    return img


# ---------------------------------------------------------------- language

def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _grouped(objects) -> list[str]:
    """'two red squares', 'a blue circle' ... in first-seen order."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    return [article(f"{c} {s}") if k == 1 else f"{count_phrase(k)} {c} {plural(s)}" for (c, s), k in groups.items()]


def caption(scene: Scene, rng: random.Random, template: int | None = None) -> str:
    """One of four natural templates (0-3; drawn from `rng` when None); each names every object's colour and shape."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    bg = f"{scene.background} background"
    if template is None:
        template = rng.randrange(4)
    elif template not in range(4):
        raise ValueError(f"caption template must be 0-3, got {template!r}")
    if template == 0:
        body = _listing([f"{article(o.noun(with_size=True))} at the {o.position}" for o in objs])
        text = f" The word \"{scene.text.word}\" is written at the {scene.text.position}." if scene.text else ""
        out = f"{body[0].upper()}{body[1:]} on a {bg}.{text}"
    elif template == 1:
        n = len(objs)
        out = f"{count_phrase(n).capitalize()} object{'s' if n > 1 else ''} on a {bg}: {_listing(_grouped(objs))}."
        if scene.text:
            out += f" It says \"{scene.text.word}\"."
    elif template == 2:
        lefts = sorted(objs, key=lambda o: (o.col, o.row))
        parts = [article(lefts[0].noun())]
        for prev, o in zip(lefts, lefts[1:]):
            rel = "to the right of it" if o.col > prev.col else ("below it" if o.row > prev.row else "above it")
            parts.append(f"{article(o.noun())} {rel}")
        out = f"From left to right: {'; '.join(parts)}."
        if scene.text:
            out += f" Text: {scene.text.word}."
    else:
        out = f"A picture of {_listing(_grouped(objs))}"
        out += f" with the text \"{scene.text.word}\"." if scene.text else "."
    return out


def _unique(scene: Scene, o: Obj) -> str | None:
    """Shortest description that picks out exactly this object, or None if none does."""
    if scene.count(shape=o.shape) == 1:
        return f"the {o.shape}"
    if scene.count(colour=o.colour, shape=o.shape) == 1:
        return f"the {o.colour} {o.shape}"
    return None


def relation_question(a: Obj, ra: str, b: Obj, rb: str) -> dict:
    """"Is A left of B?" when the two stand in different columns, else "Is A above B?", answered from the scene."""
    if a.col != b.col:
        return {"type": "position", "q": f"Is {ra} left of {rb}?", "a": "yes" if a.col < b.col else "no"}
    return {"type": "position", "q": f"Is {ra} above {rb}?", "a": "yes" if a.row < b.row else "no"}


def questions(scene: Scene, rng: random.Random, per_type: int = 2) -> list[dict]:
    """Question/answer pairs of five types, answers being short exact strings."""
    qa: list[dict] = []
    objs = list(scene.objects)

    def add(kind: str, q: str, a: str):
        qa.append({"type": kind, "q": q, "a": a})

    for o in rng.sample(objs, min(per_type, len(objs))):
        ref = f"the {o.shape}" if scene.count(shape=o.shape) == 1 else None
        if ref:
            add("colour", f"What colour is {ref}?", o.colour)
        if scene.count(colour=o.colour) == 1:
            add("shape", f"What shape is the {o.colour} object?", o.shape)
    for _ in range(per_type):
        which = rng.randrange(3)
        if which == 0:
            add("count", "How many objects are there?", str(len(objs)))
        elif which == 1:
            c = rng.choice(list(COLOURS))
            add("count", f"How many {c} objects are there?", str(scene.count(colour=c)))
        else:
            s = rng.choice(SHAPES)
            add("count", f"How many {plural(s)} are there?", str(scene.count(shape=s)))
    refs = [(o, _unique(scene, o)) for o in objs]
    refs = [(o, r) for o, r in refs if r]
    for o, r in rng.sample(refs, min(per_type, len(refs))):
        add("position", f"Where is {r}?", o.position)
    if len(refs) >= 2:
        (a, ra), (b, rb) = rng.sample(refs, 2)
        if (a.row, a.col) != (b.row, b.col):
            qa.append(relation_question(a, ra, b, rb))
    add("text", "What is written in the image?", scene.text.word if scene.text else "nothing")
    return qa


def grid_description(scene: Scene) -> str:
    """The scene cell by cell, in reading order, every cell named: "top left: red square top left; top centre:
    empty; ...; bottom right: the word cat." (a training target and the evaluation's first answer when a model
    is trained to describe first, TaskMix.describe_first). A fixed order of named cells turns reading into
    lookups: at "top centre:" the model looks up the codes of that cell (as it does when it writes an image from
    a caption), and a later question is answered from the text it wrote. An object's cell is named again after
    it, so "Where is the red square?" is answered by copying what follows "red square" (an induction-head
    copy); with the cell only before the object the model did not learn to use the description in 1,750 steps
    (study screen 9)."""
    what: dict[tuple[int, int], str] = {(o.row, o.col): f"{o.colour} {o.shape} {o.position}" for o in scene.objects}
    if scene.text:
        what[(scene.text.row, scene.text.col)] = f"the word {scene.text.word}"
    cells = [f"{position_name(r, c)}: {what.get((r, c), 'empty')}" for r in range(len(ROWS)) for c in range(len(COLS))]
    return "; ".join(cells) + "."


EXTRA_QUESTIONS = ("where_by_colour", "count_present", "count_any", "count_every", "relation_more")


def extra_questions(scene: Scene, kinds: tuple[str, ...] | list[str], rng: random.Random | None = None,
                    asked: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """Training-only questions beside the stored ones (the evaluation keeps asking the stored kinds).

    where_by_colour: "Where is the red object?" for each object whose colour is unique in the scene. A model
    finds an object by its colour long before it finds it by its shape (a code says its colour; a shape is spread
    over several codes), so these teach the "where" answer to read the cell of the object it found.

    count_present: "How many red objects are there?" for the first object's colour and "How many squares are
    there?" for the last object's shape (objects are stored in a random order: a colour and a shape the scene
    has). The stored count questions draw a colour or shape at random, so most of their answers are 0, and counts
    of 2 or 3 things of one kind - the ones the demo model gets most wrong - are rare in training.

    count_any: two more "How many red objects?" (two colours) and two more "How many squares?" (two shapes), drawn
    at random as the stored ones are: more counts by attribute per image with the answers' prior unchanged
    (count_present shifted it: study screen 20).

    count_every: the count of every colour and of every shape not already asked (the scene's whole histogram,
    zeros included: six colours and five shapes, so the answers' prior is the stored one); count_any adds nothing
    beside it.

    relation_more: up to two more "Is A left of B?" / "Is A above B?" about pairs of uniquely named objects, in a
    random order (so yes and no are equally likely), phrased as the stored one: the stored questions ask at most
    one relation per image.

    The random kinds draw from `rng` (a document's), or from one seeded by the scene when none is given, and
    leave out what `asked` (the stored questions) already asks: a count of the same thing, a relation of the same
    two objects in either order (the second answer would be a copy of the first).
    """
    unknown = set(kinds) - set(EXTRA_QUESTIONS)
    if unknown:
        raise ValueError(f"unknown extra questions {sorted(unknown)}; known: {EXTRA_QUESTIONS}")
    qa: list[dict] = []
    if "where_by_colour" in kinds:
        for o in scene.objects:
            if scene.count(colour=o.colour) == 1:
                qa.append({"type": "position", "q": f"Where is the {o.colour} object?", "a": o.position})
    if "count_present" in kinds and scene.objects:
        colour, shape = scene.objects[0].colour, scene.objects[-1].shape
        qa.append({"type": "count", "q": f"How many {colour} objects are there?", "a": str(scene.count(colour=colour))})
        qa.append({"type": "count", "q": f"How many {plural(shape)} are there?", "a": str(scene.count(shape=shape))})
    if rng is None and ("count_any" in kinds or "relation_more" in kinds):
        rng = random.Random(json.dumps(scene.to_json(), sort_keys=True))
    asked = set(asked)
    if "count_every" in kinds:
        qa += [{"type": "count", "q": q, "a": a} for q, a in (
            *((f"How many {c} objects are there?", str(scene.count(colour=c))) for c in COLOURS),
            *((f"How many {plural(s)} are there?", str(scene.count(shape=s))) for s in SHAPES)) if q not in asked]
    elif "count_any" in kinds:
        colours = [c for c in COLOURS if f"How many {c} objects are there?" not in asked]
        for colour in rng.sample(colours, min(2, len(colours))):
            qa.append({"type": "count", "q": f"How many {colour} objects are there?",
                       "a": str(scene.count(colour=colour))})
        shapes = [s for s in SHAPES if f"How many {plural(s)} are there?" not in asked]
        for shape in rng.sample(shapes, min(2, len(shapes))):
            qa.append({"type": "count", "q": f"How many {plural(shape)} are there?", "a": str(scene.count(shape=shape))})
    if "relation_more" in kinds:
        refs = [(o, r) for o in scene.objects if (r := _unique(scene, o))]
        related = {frozenset(m.group(1, 3)) for q in asked if (m := _RELATION.match(q))}
        pairs = [(refs[i], refs[j]) for i in range(len(refs)) for j in range(i + 1, len(refs))
                 if frozenset((refs[i][1], refs[j][1])) not in related]
        for pair in rng.sample(pairs, min(2, len(pairs))):
            (a, ra), (b, rb) = pair if rng.random() < 0.5 else pair[::-1]
            qa.append(relation_question(a, ra, b, rb))
    return qa


_RELATION = re.compile(r"^Is (the [a-z ]+?) (left of|above) (the [a-z ]+)\?$")
_COUNT = re.compile(r"^How many ([a-z ]+?) are there\?$")


def _referent(scene: Scene, ref: str) -> Obj | None:
    """The object "the square" / "the red square" names (the questions name only unique ones)."""
    words = ref.removeprefix("the ").split()
    hits = [o for o in scene.objects if words in ([o.shape], [o.colour, o.shape])]
    return hits[0] if len(hits) == 1 else None


WORKED_KINDS = ("relation", "count", "shape", "colour")
_SHAPE_OF = re.compile(r"^What shape is (the [a-z]+ object)\?$")
_COLOUR_OF = re.compile(r"^What colour is (the [a-z ]+?)\?$")


def worked_kinds(setting) -> tuple[str, ...]:
    """The question kinds a `worked_answers` setting works out: true = all of WORKED_KINDS, false/null = none, or
    a list of them (`[relation]`)."""
    if setting is None or setting is False:
        return ()
    if setting is True:
        return WORKED_KINDS
    kinds = (setting,) if isinstance(setting, str) else tuple(setting)
    unknown = set(kinds) - set(WORKED_KINDS)
    if unknown:
        raise ValueError(f"worked_answers: unknown {sorted(unknown)}; true, false or a list of {list(WORKED_KINDS)}")
    return tuple(k for k in WORKED_KINDS if k in kinds)


def worked_answer(scene: Scene, question: str, answer: str, kinds: tuple[str, ...] = WORKED_KINDS) -> str:
    """The answer with its working, for the questions that compose lookups (TaskMix.worked_answers): a relation
    first says where each of its two objects is, a count first lists the cells of what it counts, a shape or
    colour question first says where the object it asks about is, then ": " and the answer itself ("the red square
    is top left, the circle is centre: yes"; "top left, bottom right: 2"; "none: 0"; "the red object is top left:
    square"). Each step is a lookup the model already makes for "Where is ...?", so the comparison, the count or
    the attribute is read from a cell the model has written down. Other questions, and ones this scene cannot work
    out, keep the plain answer; `final_answer` takes the answer back out of either. `kinds` names which get their
    working."""
    m = _RELATION.match(question)
    if m and "relation" in kinds:
        a, b = _referent(scene, m.group(1)), _referent(scene, m.group(3))
        if a is None or b is None:
            return answer
        return f"{m.group(1)} is {a.position}, {m.group(3)} is {b.position}: {answer}"
    m = _COUNT.match(question)
    if m and "count" in kinds:
        what = m.group(1).split()
        if what == ["objects"]:
            hits = list(scene.objects)
        elif len(what) == 2 and what[1] == "objects" and what[0] in COLOURS:
            hits = [o for o in scene.objects if o.colour == what[0]]
        elif len(what) == 1 and what[0] in {plural(s) for s in SHAPES}:
            hits = [o for o in scene.objects if plural(o.shape) == what[0]]
        else:
            return answer
        cells = [o.position for o in sorted(hits, key=lambda o: (o.row, o.col))]
        return f"{', '.join(cells) or 'none'}: {answer}"
    for kind, pattern in (("shape", _SHAPE_OF), ("colour", _COLOUR_OF)):
        m = pattern.match(question)
        if m and kind in kinds:
            words = m.group(1).removeprefix("the ").split()
            hits = [o for o in scene.objects if (words == [o.colour, "object"] if kind == "shape" else words == [o.shape])]
            return f"{m.group(1)} is {hits[0].position}: {answer}" if len(hits) == 1 else answer
    return answer


def final_answer(text: str) -> str:
    """The answer a model wrote, without its working (what follows the last ": ", if any)."""
    return text.rsplit(": ", 1)[-1].strip()


def make_sample(cfg: WorldConfig, split: str, index: int) -> dict:
    """Everything a shard holds for one scene: image, caption, QA and the scene itself."""
    scene = sample_scene(cfg, split, index)
    rng = scene_rng(cfg, split + "/lang", index)
    cap = caption(scene, rng)
    return {
        "image": render(scene),
        "caption": cap,
        "meta": {"split": split, "index": index, "caption": cap, "width": scene.resolution,
                 "height": scene.resolution, "scene": scene.to_json(), "qa": questions(scene, rng)},
    }


def description_entropy(cfg: WorldConfig) -> float:
    """Entropy, in nats, of everything a full caption (template 0) fixes about a training scene: the
    background, how many objects, each one's colour, shape, size and cell, and the word and its cell.

    Exact, from `sample_scene`'s own draws: n objects ~ U{min..max}; text with probability text_prob in one more
    cell; the occupied cells an ordered sample of 9, of which the description keeps the set of object cells and
    the text's cell; per object a (colour, shape) pair uniform over those not held out, and a size. No image can
    carry more caption information than this (the sub-cell jitter is not described, so it is not counted).
    """
    pairs = len(cfg.colours) * len(cfg.shapes) - len({p for p in cfg.heldout
                                                       if p[0] in cfg.colours and p[1] in cfg.shapes})
    words = len(words_for(cfg.resolution))
    ns = range(cfg.min_objects, cfg.max_objects + 1)
    h = math.log(len(ns)) + math.log(len(cfg.backgrounds))
    for t, pt in ((0, 1 - cfg.text_prob), (1, cfg.text_prob)):
        if pt == 0:
            continue
        h -= pt * math.log(pt)
        for n in ns:  # log of 1 / P(these object cells, this text cell) = log C(9, n) + t log(9 - n)
            h += pt / len(ns) * (math.log(math.comb(9, n)) + t * math.log(9 - n) + n * math.log(pairs * len(SIZES))
                                 + t * math.log(words))
    return h
