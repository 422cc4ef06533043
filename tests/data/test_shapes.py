"""The shapes world's answer key must match its pictures, measured on the rendered pixels."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from data.shapes import (BACKGROUNDS, COLOURS, DEFAULT_HELDOUT, INK, SHAPES, Obj, Scene, WorldConfig, caption,
                         final_answer, make_sample, position_name, questions, render, sample_scene, worked_answer)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixels (a test-local flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        out.append(np.array(pix))
    return out


@pytest.mark.parametrize("resolution", [32, 48, 64, 128])
def test_rendered_pixels_match_the_scene(resolution):
    cfg = WorldConfig(resolution=resolution)
    cell = resolution / 3
    for i in range(60):
        scene = sample_scene(cfg, "train", i)
        img = np.asarray(render(scene))
        palette = {tuple(v) for v in COLOURS.values()} | {BACKGROUNDS[scene.background], INK[scene.background]}
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette, "renderer produced off-palette pixels"
        for name, rgb in COLOURS.items():
            mask = (img == rgb).all(-1)
            comps = [c for c in components(mask) if len(c) >= 4]
            objs = [o for o in scene.objects if o.colour == name]
            assert len(comps) == len(objs), f"scene {i}: {len(objs)} {name} objects, {len(comps)} blobs"
            # every blob sits in the cell its object names, and its size class is right
            cells = sorted((int(c[:, 0].mean() // cell), int(c[:, 1].mean() // cell), np.ptp(c[:, 1]) + 1) for c in comps)
            want = sorted((o.row, o.col, o.extent) for o in objs)
            for (r, c, w), (wr, wc, we) in zip(cells, want):
                assert (r, c) == (wr, wc)
                assert abs(w - we) <= 2
        ink = (img == INK[scene.background]).all(-1).sum()
        assert (ink > 0) == (scene.text is not None)


def test_scenes_are_deterministic_and_distinct():
    cfg = WorldConfig()
    a, b = sample_scene(cfg, "train", 7), sample_scene(cfg, "train", 7)
    assert a == b
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert sample_scene(cfg, "train", 8) != a
    assert sample_scene(WorldConfig(seed=1), "train", 7) != a
    assert Scene.from_json(a.to_json()) == a


def test_heldout_pairs_split_cleanly():
    cfg = WorldConfig()
    held = set(DEFAULT_HELDOUT)
    for split in ("train", "val", "test"):
        for i in range(300):
            assert not (sample_scene(cfg, split, i).pairs() & held), f"{split} scene {i} has a held-out pair"
    for i in range(300):
        assert sample_scene(cfg, "holdout", i).pairs() & held
    # every colour and every shape still appears in training, only the pairs are new
    seen = set().union(*(sample_scene(cfg, "train", i).pairs() for i in range(500)))
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_answers_follow_from_the_scene():
    cfg = WorldConfig()
    kinds = set()
    for i in range(200):
        s = make_sample(cfg, "val", i)
        scene = Scene.from_json(s["meta"]["scene"])
        for qa in s["meta"]["qa"]:
            kinds.add(qa["type"])
            q, a = qa["q"], qa["a"]
            if q == "How many objects are there?":
                assert a == str(len(scene.objects))
            elif q.startswith("How many ") and " objects" in q:
                assert a == str(scene.count(colour=q.split()[2]))
            elif q.startswith("How many "):
                shape = next(sh for sh in SHAPES if q.split()[2].startswith(sh[:4]))
                assert a == str(scene.count(shape=shape))
            elif q.startswith("What colour is the "):
                shape = q.removeprefix("What colour is the ").rstrip("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [a]
            elif q.startswith("What shape is the "):
                colour = q.split()[4]
                assert [o.shape for o in scene.objects if o.colour == colour] == [a]
            elif q.startswith("Where is "):
                ref = q.removeprefix("Where is the ").rstrip("?").split()
                objs = [o for o in scene.objects if o.shape == ref[-1] and (len(ref) == 1 or o.colour == ref[0])]
                assert len(objs) == 1 and position_name(objs[0].row, objs[0].col) == a
            elif q == "What is written in the image?":
                assert a == (scene.text.word if scene.text else "nothing")
    assert kinds == {"colour", "shape", "count", "position", "text"}


def test_worked_answers_say_where_before_they_compare_or_count():
    """A relation names both objects' cells, a count lists the cells of what it counts (reading order; "none" for
    0), a shape or colour answer first says where its object is, then ": " and the stored answer, which
    final_answer takes back out; "where" and text keep their plain answer, and so do the kinds left out of
    `kinds`. Over 200 generated scenes every relation, count, shape and colour question is worked, and its working
    agrees with the scene."""
    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 8.0)

    scene = Scene(48, "white", (obj("blue", "square", 2, 1), obj("blue", "cross", 0, 0), obj("red", "cross", 1, 1)))
    assert worked_answer(scene, "Is the square left of the red cross?", "no") == \
        "the square is bottom centre, the red cross is centre: no"
    assert worked_answer(scene, "Is the blue cross above the square?", "yes") == \
        "the blue cross is top left, the square is bottom centre: yes"
    assert worked_answer(scene, "How many blue objects are there?", "2") == "top left, bottom centre: 2"
    assert worked_answer(scene, "How many crosses are there?", "2") == "top left, centre: 2"
    assert worked_answer(scene, "How many objects are there?", "3") == "top left, centre, bottom centre: 3"
    assert worked_answer(scene, "How many circles are there?", "0") == "none: 0"
    assert worked_answer(scene, "How many green objects are there?", "0") == "none: 0"
    assert worked_answer(scene, "What shape is the red object?", "cross") == "the red object is centre: cross"
    assert worked_answer(scene, "What colour is the square?", "blue") == "the square is bottom centre: blue"
    assert worked_answer(scene, "What colour is the square?", "blue", ("relation", "count", "shape")) == "blue"
    assert worked_answer(scene, "What shape is the red object?", "cross", ("colour",)) == "cross"
    assert worked_answer(scene, "How many crosses are there?", "2", ("shape", "colour")) == "2"
    for q, a in [("Where is the square?", "bottom centre"), ("What is written in the image?", "nothing"),
                 ("Is the cross left of the square?", "yes"), ("What colour is the cross?", "red"),
                 ("What shape is the blue object?", "square")]:
        assert worked_answer(scene, q, a) == a  # "the cross", "the blue object" are not unique here: no working
    assert final_answer("the square is bottom centre, the red cross is centre: no") == "no"
    assert final_answer("top left") == "top left" and final_answer("none: 0") == "0"
    worked = 0
    for i in range(200):
        s = make_sample(WorldConfig(), "val", i)
        scene = Scene.from_json(s["meta"]["scene"])
        for qa in s["meta"]["qa"]:
            w = worked_answer(scene, qa["q"], qa["a"])
            assert final_answer(w) == qa["a"]
            if qa["q"].startswith(("Is ", "How many ", "What shape ", "What colour ")):
                worked += 1
                steps = w.rsplit(": ", 1)[0]
                assert ": " in w and steps
                if qa["q"].startswith("How many "):  # as many cells listed as the count says
                    assert (0 if steps == "none" else len(steps.split(", "))) == int(qa["a"])
                if qa["q"].startswith("What "):  # the cell of the one object the question names
                    ref, cell = steps.split(" is ")
                    words = ref.removeprefix("the ").split()
                    hits = [o for o in scene.objects if words in ([o.shape], [o.colour, "object"])]
                    assert len(hits) == 1 and hits[0].position == cell
            else:
                assert w == qa["a"]
    assert worked > 600


def test_captions_name_every_object():
    cfg = WorldConfig()
    templates = set()
    for i in range(200):
        scene = sample_scene(cfg, "train", i)
        cap = caption(scene, random.Random(i))
        templates.add(cap.split()[0])
        for o in scene.objects:
            assert o.colour in cap
            assert o.shape in cap or (o.shape + "s") in cap or "crosses" in cap
        if scene.text:
            assert scene.text.word in cap
    assert len(templates) >= 4


@pytest.mark.parametrize("bad", [dict(resolution=16), dict(resolution=512), dict(max_objects=9),
                                 dict(colours=("mauve",)), dict(min_objects=3, max_objects=2)])
def test_bad_world_configs_are_refused(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_description_entropy_by_hand_and_the_default_world():
    from data.shapes import description_entropy

    # one object, no text, one background: the cell (9) and the colour (2) x shape (1) x size (2) pair
    tiny = WorldConfig(min_objects=1, max_objects=1, text_prob=0.0, colours=("red", "blue"), shapes=("square",),
                       backgrounds=("white",), heldout=())
    assert description_entropy(tiny) == pytest.approx(math.log(9 * 2 * 2))
    # held-out pairs are never drawn in training: fewer pairs, less to describe
    held = WorldConfig(min_objects=1, max_objects=1, text_prob=0.0, colours=("red", "blue"), shapes=("square",),
                       backgrounds=("white",), heldout=(("red", "square"),))
    assert description_entropy(held) == pytest.approx(math.log(9 * 1 * 2))
    assert 20 < description_entropy(WorldConfig()) < 25
