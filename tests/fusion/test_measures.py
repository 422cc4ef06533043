"""The evaluation's diagnostics measure what they claim: the caption information gain is clearly positive for
a model trained where the caption fixes the image and ~0 for the same model trained on shuffled captions; the
VQA binding breakdown counts wrong answers that name another object's attribute."""

from __future__ import annotations

import math

import numpy as np
import torch

import fusion.evaluate
from data.shapes import Obj, Scene
from fusion.checkpoint import Bundle
from fusion.decoder import lm_losses
from fusion.evaluate import caption_gain, vqa_accuracy
from fusion.sequences import Packer, Segment, tokenize

NO_MODEL = Bundle(None, None, None, meta={})  # answers are monkeypatched: only the reading protocol is looked at
from tests.fusion.helpers import tiny_decoder, tiny_vocab

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def scenes(vocab, n: int, shuffled: bool, seed: int) -> list[dict]:
    """Each caption names one of four fixed code patterns; shuffled, the caption is drawn apart from it."""
    g = vocab.layout.grid
    patterns = np.random.default_rng(123).integers(0, vocab.num_codes, (len(CAPTIONS), g, g))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % len(CAPTIONS)  # neighbours differ, so "another scene's caption" is always a wrong one
        c = int(rng.integers(len(CAPTIONS))) if shuffled else k
        out.append({"caption": CAPTIONS[c], "image": patterns[k], "meta": {}})
    return out


def train(vocab, samples: list[dict], steps: int = 120) -> torch.nn.Module:
    """A few steps on caption -> image documents, one prompt in five emptied (as training does, for CFG)."""
    torch.manual_seed(0)
    dec = tiny_decoder(vocab).train()
    packer = Packer(64, vocab.pad)
    packed = [p for i, s in enumerate(samples)
              for p in packer.add(tokenize(vocab, [Segment.txt("" if i % 5 == 4 else s["caption"], loss=False),
                                                   Segment.img(s["image"])]))]
    packed += packer.flush()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for step in range(steps):
        chunk = [packed[(step * 8 + j) % len(packed)] for j in range(8)]
        batch = {k: torch.stack([torch.from_numpy(getattr(p, k)) for p in chunk])
                 for k in ("input_ids", "labels", "position_ids", "modality")}
        logits = dec(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = lm_losses(logits, batch["labels"], batch["modality"], 0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval()


def gain(shuffled: bool) -> dict:
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = train(vocab, scenes(vocab, 256, shuffled, seed=0))
    with torch.no_grad():
        return caption_gain(Bundle(dec, vocab, tokenizer=None, meta={}), scenes(vocab, 32, shuffled, seed=1), 64)


def test_caption_gain_is_what_the_caption_fixes_and_nothing_when_captions_are_shuffled():
    real, shuffled = gain(shuffled=False), gain(shuffled=True)
    # the caption picks one of four equally likely patterns: I(image; caption) = log 4 nats, which the gain
    # against the empty caption estimates; against a wrong caption the model is confidently wrong: far more
    assert 0.7 * math.log(4) < real["gain_vs_empty"] < 1.3 * math.log(4)
    assert real["gain"] > 3 * math.log(4)
    assert abs(shuffled["gain"]) < 0.5 and abs(shuffled["gain_vs_empty"]) < 0.5
    assert real["images"] == shuffled["images"] == 32 and "bound" not in real


def test_vqa_binding_breakdown_counts_answers_that_belong_to_another_object(monkeypatch):
    objs = (Obj("circle", "red", "large", 0, 0, 8, 8, 10), Obj("square", "blue", "small", 2, 2, 40, 40, 6))
    scene = Scene(resolution=48, background="white", objects=objs, text=None).to_json()
    qa = [{"type": "colour", "q": "What colour is the circle?", "a": "red"},
          {"type": "colour", "q": "What colour is the square?", "a": "blue"},
          {"type": "shape", "q": "What shape is the red object?", "a": "circle"},
          {"type": "position", "q": "Where is the circle?", "a": "top left"},
          {"type": "position", "q": "Is the circle left of the square?", "a": "yes"}]
    answers = ["blue", "green", "circle", "bottom right", "no"]  # bound wrong, unseen, right, bound wrong, wrong
    monkeypatch.setattr(fusion.evaluate, "answer_questions", lambda bundle, items, described=None: answers[:len(items)])
    r = vqa_accuracy(NO_MODEL, [{"image": None, "meta": {"scene": scene, "qa": qa}}], max_questions=100)
    assert r["per_type"] == {"colour": 0.0, "position": 0.0, "shape": 1.0}
    assert r["wrong_in_scene"] == {"colour": 0.5, "position": 1.0}  # the yes/no question is not counted
    assert r["wrong_in_scene_chance"] == {"colour": 1 / 5, "position": 1 / 8}  # one other object among 6 / 9 answers


def test_position_detail_splits_row_from_column_and_flags_a_constant_yes(monkeypatch):
    lone = Scene(resolution=48, background="white", objects=(Obj("circle", "red", "large", 0, 2, 40, 8, 10),),
                 text=None).to_json()
    objs = (Obj("circle", "red", "large", 0, 0, 8, 8, 10), Obj("square", "blue", "small", 2, 2, 40, 40, 6))
    pair = Scene(resolution=48, background="white", objects=objs, text=None).to_json()
    samples = [{"image": None, "meta": {"scene": lone, "qa": [
                   {"type": "position", "q": "Where is the circle?", "a": "top right"}]}},
               {"image": None, "meta": {"scene": pair, "qa": [
                   {"type": "position", "q": "Where is the circle?", "a": "top left"},
                   {"type": "position", "q": "Where is the square?", "a": "bottom right"},
                   {"type": "position", "q": "Is the circle left of the square?", "a": "yes"},
                   {"type": "position", "q": "Is the square left of the circle?", "a": "no"}]}}]
    # lone: row right, column wrong; pair: wrong row right column, right; relations: "yes" to both
    answers = ["top left", "bottom left", "bottom right", "yes", "yes"]
    monkeypatch.setattr(fusion.evaluate, "answer_questions", lambda bundle, items, described=None: answers[:len(items)])
    d = vqa_accuracy(NO_MODEL, samples, max_questions=100)["position_detail"]
    assert d["where_single"] == {"questions": 1, "right": 0.0, "row": 1.0, "column": 0.0}
    assert d["where_several"] == {"questions": 2, "right": 0.5, "row": 0.5, "column": 1.0}
    assert d["relation"] == {"questions": 2, "right": 0.5, "said_yes": 1.0}
    line = [x for x in fusion.evaluate.summary_table({"vqa_test": {"per_type": {}, "accuracy": 0, "questions": 5,
                                                                   "position_detail": d}}).splitlines()
            if x.startswith("VQA position")]
    assert line and "column 0%" in line[0] and "said yes 100%" in line[0]


def test_count_detail_splits_the_forms_and_the_true_counts(monkeypatch):
    objs = (Obj("circle", "red", "large", 0, 0, 8, 8, 10), Obj("square", "blue", "small", 2, 2, 40, 40, 6))
    pair = Scene(resolution=48, background="white", objects=objs, text=None).to_json()
    qa = [{"type": "count", "q": "How many objects are there?", "a": "2"},
          {"type": "count", "q": "How many red objects are there?", "a": "1"},
          {"type": "count", "q": "How many green objects are there?", "a": "0"},
          {"type": "count", "q": "How many squares are there?", "a": "1"},
          {"type": "colour", "q": "What colour is the circle?", "a": "red"}]
    answers = ["2", "2", "0", "3", "red"]  # right, off by one, right, off by two, (not a count)
    monkeypatch.setattr(fusion.evaluate, "answer_questions", lambda bundle, items, described=None: answers[:len(items)])
    d = vqa_accuracy(NO_MODEL, [{"image": None, "meta": {"scene": pair, "qa": qa}}], max_questions=100)["count_detail"]
    assert d["by_form"] == {"colour": {"questions": 2, "right": 0.5}, "objects": {"questions": 1, "right": 1.0},
                            "shape": {"questions": 1, "right": 0.0}}
    assert list(d["by_truth"]) == ["0", "1", "2"] and d["by_truth"]["1"] == {"questions": 2, "right": 0.0}
    assert d["wrong_off_by_one"] == 0.5
    line = [x for x in fusion.evaluate.summary_table({"vqa_test": {"per_type": {}, "accuracy": 0, "questions": 5,
                                                                   "count_detail": d}}).splitlines()
            if x.startswith("VQA count")]
    assert line and "shape 0%" in line[0] and "off by one 50%" in line[0]


def test_a_worked_answer_is_scored_by_what_follows_its_working(monkeypatch):
    """A model trained with worked answers (its saved `reading`) is scored on what follows the last ": " of what it
    wrote, so a right count after wrong working counts as right and the working is kept in the examples; a model
    trained without them is scored on the whole line, as before."""
    objs = (Obj("circle", "red", "large", 0, 0, 8, 8, 10), Obj("square", "blue", "small", 2, 2, 40, 40, 6))
    pair = Scene(resolution=48, background="white", objects=objs, text=None).to_json()
    qa = [{"type": "count", "q": "How many objects are there?", "a": "2"},
          {"type": "position", "q": "Is the circle left of the square?", "a": "yes"},
          {"type": "colour", "q": "What colour is the circle?", "a": "red"}]
    written = ["top left, bottom right: 2", "the circle is top left, the square is top right: no", "red"]
    monkeypatch.setattr(fusion.evaluate, "answer_questions", lambda bundle, items, described=None: written[:len(items)])
    sample = [{"image": None, "meta": {"scene": pair, "qa": qa}}]
    worked = vqa_accuracy(Bundle(None, None, None, meta={"reading": {"worked_answers": True}}), sample, 100)
    assert worked["per_type"] == {"colour": 1.0, "count": 1.0, "position": 0.0}
    assert worked["examples"][0] == {"q": qa[0]["q"], "truth": "2", "answer": "2", "written": written[0]}
    assert "written" not in worked["examples"][2]
    assert worked["records"][1] == {"type": "position", "q": qa[1]["q"], "truth": "yes", "answer": "no",
                                    "written": written[1]}  # every answer, for fusion.evaluate's answers file
    assert vqa_accuracy(NO_MODEL, sample, 100)["per_type"] == {"colour": 1.0, "count": 0.0, "position": 0.0}


def test_binding_probe_finds_the_asked_object_and_reads_cells_back_from_the_residual():
    """fusion/probes.py on a random-init decoder with strong 2-D tables: a code's cell is read off the input
    embedding (block 0) almost always and the attention shares are shares; the asked object is the one the
    question names (by shape, by colour, by colour and shape), None when the name is ambiguous."""
    from data.shapes import WorldConfig, make_sample
    from fusion.probes import asked_object, binding_probe, code_mask
    from tests.fusion.helpers import random_codes

    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 10.0)

    scene = Scene(48, "white", (obj("red", "square", 0, 0), obj("blue", "square", 2, 1), obj("blue", "cross", 1, 2)))
    assert asked_object(scene, "What colour is the cross?") == ("find_by_shape", scene.objects[2])
    assert asked_object(scene, "What shape is the red object?") == ("find_by_colour", scene.objects[0])
    assert asked_object(scene, "Where is the blue square?") == ("where", scene.objects[1])
    assert asked_object(scene, "Where is the square?") is None and asked_object(scene, "How many?") is None
    cells = np.array([[0, 0]] + [[r + 1, c + 1] for r in range(12) for c in range(12)])  # <boi>, then a 12 x 12 grid
    mask = code_mask(scene, scene.objects[0], cells, 12)
    # pixels 3-13 of a 48 px image on a 12 x 12 grid: the codes centred at 6 and 10 px, rows and columns 2-3
    assert not mask[0] and set(map(tuple, cells[mask])) == {(r, c) for r in (2, 3) for c in (2, 3)}

    torch.manual_seed(0)
    vocab = tiny_vocab(grid=4, num_codes=32)
    dec = tiny_decoder(vocab, init_std=0.3, image_pos_embed=True, image_layout=vocab.image_layout())
    dec.image_rows.weight.data *= 10
    dec.image_cols.weight.data *= 10
    world = WorldConfig()
    samples = [{"image": random_codes(vocab, i), "meta": make_sample(world, "test", i)["meta"]} for i in range(40)]
    r = binding_probe(Bundle(dec, vocab, None, meta={"arm": "fusion"}), samples)
    assert r["codes"] > 50 and len(r["cell_from_code"]) == 3  # the input, then each of the 2 blocks
    assert r["cell_from_code"][0] >= 0.9
    asked = r["attention_share_best_head"]
    assert sum(v["questions"] for v in asked.values()) > 10
    for v in asked.values():
        assert all(0 <= x <= 1 for x in v["per_block"]) and (v["area_share"] is None or 0 < v["area_share"] < 1)
    assert dec.lm.config._attn_implementation == "sdpa"  # restored after the probe
    # a describe-first model: asked after its own description, and the description probe is added
    described = binding_probe(Bundle(dec, vocab, None, meta={"reading": {"describe_first": True}}), samples[:12])
    assert described["codes"] > 0 and 0 <= described["description"]["moved_follows_text"] <= 1


def test_description_probe_moves_the_asked_objects_cell_in_the_text(monkeypatch):
    """For a describe-first model the probe asks "Where" after the true description and after one with the asked
    object's cell moved: a reader that answers from the text scores 1 / 1 / 0, one that ignores it follows the
    moved text only by chance."""
    import re

    import fusion.probes
    from data.shapes import WorldConfig, make_sample
    from fusion.probes import description_probe
    from tests.fusion.helpers import random_codes

    vocab = tiny_vocab(grid=4, num_codes=32)
    samples = [{"image": random_codes(vocab, i), "meta": make_sample(WorldConfig(), "test", i)["meta"]} for i in range(30)]
    bundle = Bundle(None, vocab, None, meta={"reading": {"describe_first": True}})

    def text_reader(bundle, prompts, max_new_tokens, batch_size=32):  # the cell named after the asked object
        out = []
        for ids, _ in prompts:
            text = vocab.decode_text(ids)
            name = re.search(r"Where is the ([a-z ]+)\?", text).group(1)
            hits = re.findall(r"(\w+ )?" + name + r" ((?:top|middle|bottom) \w+|centre)", text)
            out.append(hits[0][1])
        return out

    monkeypatch.setattr(fusion.probes, "greedy_lines", text_reader)
    r = description_probe(bundle, samples)
    assert r["questions"] > 5
    assert r["right_given_true_text"] == 1.0 and r["moved_follows_text"] == 1.0 and r["moved_keeps_image"] == 0.0
    monkeypatch.setattr(fusion.probes, "greedy_lines", lambda b, prompts, *a, **k: ["top left"] * len(prompts))
    assert description_probe(bundle, samples)["moved_follows_text"] < 0.5
