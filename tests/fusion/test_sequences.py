"""Documents -> packed sequences: targets, loss masks, modality labels, document isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.sequences import IGNORE, Packer, Segment, pack, tokenize
from tests.fusion.helpers import random_codes, tiny_decoder, tiny_vocab


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


def test_loss_mask_covers_answers_and_images_only(vocab):
    codes = random_codes(vocab)
    doc = tokenize(vocab, [Segment.img(codes, loss=False), Segment.txt("Q: What colour is the circle? A:", loss=False),
                           Segment.txt(" red\n", loss=True)])
    p = pack([doc], 128, vocab.pad)
    targets = p.labels[p.labels != IGNORE]
    assert vocab.decode_text(targets.tolist()) == " red\n" or vocab.decode_text(targets[:-1].tolist()) == " red\n"
    assert targets[-1] == vocab.eos  # the answer ends the document, so <eos> is a target too
    assert (p.modality[p.labels != IGNORE] == 0).all()

    t2i = tokenize(vocab, [Segment.txt("A picture of a red circle.", loss=False), Segment.img(codes, loss=True)])
    p = pack([t2i], 128, vocab.pad)
    tgt = p.labels != IGNORE
    span = vocab.layout.span_len
    assert tgt.sum() == span + 1  # <boi> ... <eoi> and <eos>
    assert (p.modality[tgt][:span] == 1).all()
    # the target at each position is the next input token
    idx = np.nonzero(tgt)[0]
    assert (p.labels[idx] == p.input_ids[idx + 1]).all()


def test_packing_keeps_documents_whole_and_restarts_positions(vocab):
    docs = [tokenize(vocab, [Segment.txt("word " * n)]) for n in (10, 30, 5, 50, 20, 8)]
    packer = Packer(64, vocab.pad, open_bins=2)
    out = [p for d in docs for p in packer.add(d)] + packer.flush()
    assert sum(p.documents for p in out) == len(docs)
    for p in out:
        starts = np.nonzero(p.position_ids == 0)[0]
        assert all(p.input_ids[s] in (vocab.bos, vocab.pad) for s in starts)
        assert (p.labels[p.input_ids == vocab.pad] == IGNORE).all()
    packer = Packer(64, vocab.pad)
    (cut,) = packer.add(tokenize(vocab, [Segment.txt("word " * 200)]))
    assert len(cut.input_ids) == 64 and packer.truncated == 1 and cut.documents == 1


def test_packed_documents_do_not_see_each_other(vocab):
    """Changing document A must not change the decoder's outputs on document B packed after it."""
    torch.manual_seed(0)
    dec = tiny_decoder(vocab)
    b = tokenize(vocab, [Segment.txt("A picture of a blue square.")])
    outs = []
    for a_text in ("A picture of a red circle.", "Two objects: a green cross and a yellow diamond."):
        p = pack([tokenize(vocab, [Segment.txt(a_text)]), b], 64, vocab.pad)
        start = int(np.nonzero((p.position_ids == 0) & (p.input_ids == vocab.bos))[0][1])
        t = p.as_tensors()
        with torch.no_grad():
            logits = dec(input_ids=t["input_ids"][None], position_ids=t["position_ids"][None]).logits[0]
        outs.append(logits[start:start + len(b)])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_curriculum_and_caption_template_shape_the_document_stream(vocab):
    """The first documents of a curriculum come only from small scenes (the rest are read and passed over);
    reading captions can be rewritten in the template that names every object's cell."""
    from data.shapes import WorldConfig, caption, make_sample, Scene
    from fusion.data import packed_sequences
    from fusion.documents import TaskMix

    world = WorldConfig()
    samples = []
    for i in range(40):
        s = make_sample(world, "train", i)
        samples.append({"key": f"{i:04d}", "codes": random_codes(vocab), "caption": s["caption"], "meta": s["meta"],
                        "notes": {}})
    sizes = {s["key"]: len(s["meta"]["scene"]["objects"]) for s in samples}
    assert sum(n == 1 for n in sizes.values()) >= 3 and max(sizes.values()) > 1

    def keys(mix):
        out = []
        for item in packed_sequences(samples, vocab, 4096, mix, seed=0):
            if "packed" in item:
                out += item["packed"].keys
        return out

    plain = keys(TaskMix())
    assert len(plain) == 40
    curriculum = keys(TaskMix(curriculum_documents=3, curriculum_max_objects=1))
    stream = [s["key"] for s in samples]
    singles = [k for k in stream if sizes[k] == 1]
    third = stream.index(singles[2])
    assert sorted(curriculum[:3]) == singles[:3]
    assert sorted(curriculum) == sorted(singles[:3] + stream[third + 1:])  # later, every sample again
    # a growing curriculum: one object for the first 2 documents, then up to two, then (after 4) everything
    grow = TaskMix(curriculum_documents=4, curriculum_max_objects=1, curriculum_step_documents=2)
    assert [grow.in_curriculum({"scene": {"objects": [0] * n}}, so_far) for n, so_far in
            ((1, 0), (2, 1), (2, 2), (3, 3), (6, 4))] == [True, False, True, False, True]
    grown = keys(grow)
    assert [sizes[k] for k in grown[:2]] == [1, 1] and all(sizes[k] <= 2 for k in grown[2:4])

    mix = TaskMix(weights={"caption": 1.0}, caption_template=0)
    scene = Scene.from_json(samples[0]["meta"]["scene"])
    full = caption(scene, None, template=0)
    assert mix.reading_caption(samples[0]["caption"], samples[0]["meta"]) == full
    assert mix.reading_caption("an emoji", {}) == "an emoji"  # no scene: the caption as stored
    text = vocab.decode_text([t for t in next(i for i in packed_sequences(samples[:1], vocab, 4096, mix, seed=0)
                                              if "packed" in i)["packed"].input_ids.tolist()
                              if t < vocab.text_size])
    assert full in text
    with pytest.raises(ValueError, match="caption_template"):
        TaskMix(caption_template=7)


def test_task_phases_switch_the_mix_at_a_training_step_and_the_curriculum_holds_in_the_first_epoch_only(vocab):
    """From a phase's step on (the stream's clock: sequences emitted / batch size), documents are drawn from its
    mix; a mix with no task for a sample passes it over; bad schedules fail; epochs after the first have no
    curriculum."""
    from data.loader import StreamClock
    from data.shapes import WorldConfig, make_sample
    from fusion.data import packed_sequences
    from fusion.documents import TaskMix

    world = WorldConfig()
    samples = [{"key": f"{i:04d}", "codes": random_codes(vocab), "caption": s["caption"], "meta": s["meta"], "notes": {}}
               for i, s in enumerate(make_sample(world, "train", i) for i in range(60))]
    mix = TaskMix(weights={"t2i": 1.0}, phases=((3, {"vqa": 1.0}),))
    assert mix.weights_at(0) == mix.weights_at(2) == {"t2i": 1.0} and mix.weights_at(3) == {"vqa": 1.0}

    def writes(p):  # a sequence with image targets holds a text-to-image document
        return bool(((torch.as_tensor(p.labels) != IGNORE) & (torch.as_tensor(p.modality) == 1)).any())

    seq_len = 2 * vocab.layout.span_len + 160  # two or three documents a sequence
    seqs = [i["packed"] for i in packed_sequences(samples, vocab, seq_len, mix, seed=0, clock=StreamClock(),
                                                 batch_size=1) if "packed" in i]
    assert all(writes(p) for p in seqs[:3])  # steps 0-2: the first mix
    written = sorted(k for p in seqs if writes(p) for k in p.keys)  # drawn before the third sequence was emitted
    assert written and written[-1] < "0020" and sum(not writes(p) for p in seqs) > len(seqs) // 2
    # without a clock (validation) the first mix throughout
    assert all(writes(i["packed"]) for i in packed_sequences(samples[:20], vocab, seq_len, mix, seed=0) if "packed" in i)
    # a mix that can make nothing of a sample (VQA only, no questions) passes it over instead of failing
    bare = [{**s, "meta": {}} for s in samples[:5]]
    items = list(packed_sequences(bare, vocab, 4096, TaskMix(weights={"vqa": 1.0}), seed=0))
    assert not any("packed" in i for i in items) and sum("__read__" in i for i in items) == 5
    for bad in (((0, {"vqa": 1.0}),), ((5, {"vqa": 1.0}), (5, {"t2i": 1.0})), ((5, {"vqa": 0.0}),),
                ((5, {"vqa_only": 1.0}),)):
        with pytest.raises(ValueError):
            TaskMix(phases=bad)

    def keys(mix, clock):
        return [k for i in packed_sequences(samples, vocab, 4096, mix, seed=0, clock=clock) if "packed" in i
                for k in i["packed"].keys]

    small = TaskMix(curriculum_documents=5, curriculum_max_objects=1)
    assert len(keys(small, StreamClock(epoch=0))) < 60 and len(keys(small, StreamClock(epoch=1))) == 60


def test_a_phase_curriculum_window_draws_only_small_scenes_during_its_steps_in_any_epoch(vocab):
    """task_phases' `curriculum`: during the window's training steps only scenes of at most max_objects objects
    become documents (the rest are read and passed over), before and after it every scene, in any epoch."""
    from data.loader import StreamClock
    from data.shapes import WorldConfig, make_sample
    from fusion.data import packed_sequences
    from fusion.documents import TaskMix

    class EverySample(StreamClock):  # the i-th sample the stream considers falls at step i
        calls = -1

        def step(self, batches_done: int) -> int:
            self.calls += 1
            return self.calls

    world = WorldConfig()
    samples = [{"key": f"{i:04d}", "codes": random_codes(vocab), "caption": s["caption"], "meta": s["meta"], "notes": {}}
               for i, s in enumerate(make_sample(world, "train", i) for i in range(60))]
    sizes = [len(s["meta"]["scene"]["objects"]) for s in samples]
    mix = TaskMix(weights={"t2i": 1.0}, curriculum_max_objects=1, curriculum_windows=((20, 40),))
    for epoch in (0, 3):
        items = list(packed_sequences(samples, vocab, 4096, mix, seed=0, clock=EverySample(epoch=epoch)))
        drawn = {int(k) for i in items if "packed" in i for k in i["packed"].keys}
        assert sum("__read__" in i for i in items) == 60  # every sample read, none lost
        assert drawn == {i for i in range(60) if not 20 <= i < 40 or sizes[i] == 1}
        assert any(sizes[i] > 1 for i in range(20, 40)) and any(sizes[i] == 1 for i in range(20, 40))
    with pytest.raises(ValueError, match="curriculum windows"):
        TaskMix(curriculum_windows=((5, 5),))


def test_extra_questions_ask_where_an_object_of_a_unique_colour_is():
    """where_by_colour adds "Where is the red object?" for each object whose colour no other object has, answered
    with its cell, to vqa documents only; samples without a scene keep their stored questions; unknown kinds fail."""
    import random

    from data.shapes import Obj, Scene, extra_questions
    from fusion.documents import TaskMix, make_document

    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 8.0)

    scene = Scene(48, "white", (obj("red", "square", 0, 0), obj("blue", "circle", 2, 1), obj("blue", "cross", 1, 2)))
    assert extra_questions(scene, ["where_by_colour"]) == [
        {"type": "position", "q": "Where is the red object?", "a": "top left"}]  # blue is not unique: not asked
    with pytest.raises(ValueError, match="unknown extra questions"):
        extra_questions(scene, ["colour_by_place"])
    with pytest.raises(ValueError, match="extra_qa"):
        TaskMix(extra_qa=("colour_by_place",))
    stored = [{"type": "count", "q": "How many objects are there?", "a": "3"}]
    mix = TaskMix(extra_qa=("where_by_colour",))
    meta = {"scene": scene.to_json()}
    assert mix.questions(stored, meta) == stored + extra_questions(scene, ["where_by_colour"])
    assert mix.questions(stored, {}) == stored and TaskMix().questions(stored, meta) == stored
    texts = [s.text for s in make_document("vqa", None, "", stored, random.Random(0), mix, meta)]
    assert "Q: Where is the red object? A:" in texts and " top left\n" in texts
    texts = [s.text for s in make_document("vqa", None, "", stored, random.Random(0), TaskMix(), meta)]
    assert "Q: Where is the red object? A:" not in texts


def test_worked_answers_are_what_vqa_documents_train_on():
    """worked_answers: a vqa document's relation and count answers carry their working, with loss on all of it;
    only the named kinds when given a list; off, or for a sample without its scene, the stored answers; an unknown
    kind fails in one line."""
    import random

    from data.shapes import Obj, Scene
    from fusion.documents import TaskMix, make_document

    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 8.0)

    scene = Scene(48, "white", (obj("blue", "square", 0, 0), obj("red", "cross", 1, 2)))
    qa = [{"type": "count", "q": "How many crosses are there?", "a": "1"},
          {"type": "position", "q": "Is the square left of the cross?", "a": "yes"}]
    meta = {"scene": scene.to_json()}
    docs = {on: make_document("vqa", None, "", qa, random.Random(0), TaskMix(worked_answers=on), meta)
            for on in (True, False, ("relation",))}
    answers = {on: sorted(seg.text for seg in d if seg.loss) for on, d in docs.items()}
    assert answers[True] == [" middle right: 1\n", " the square is top left, the cross is middle right: yes\n"]
    assert answers[False] == [" 1\n", " yes\n"]
    assert answers[("relation",)] == [" 1\n", " the square is top left, the cross is middle right: yes\n"]
    assert TaskMix(worked_answers=True).answered(qa, {}) == qa
    with pytest.raises(ValueError, match="worked_answers: unknown"):
        TaskMix(worked_answers=("relations",))


def test_extra_count_questions_ask_about_a_colour_and_a_shape_the_scene_has():
    """count_present asks how many objects share the first object's colour and the last one's shape, answered
    from the scene, so counts above zero are asked in every vqa document; the stored questions stay as they are."""
    from data.shapes import Obj, Scene, extra_questions
    from fusion.documents import TaskMix

    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 8.0)

    scene = Scene(48, "white", (obj("blue", "square", 0, 0), obj("blue", "cross", 2, 1), obj("red", "cross", 1, 2)))
    assert extra_questions(scene, ["count_present"]) == [
        {"type": "count", "q": "How many blue objects are there?", "a": "2"},
        {"type": "count", "q": "How many crosses are there?", "a": "2"}]
    assert extra_questions(Scene(48, "black", ()), ["count_present"]) == []
    both = extra_questions(scene, ["where_by_colour", "count_present"])
    assert both == extra_questions(scene, ["where_by_colour"]) + extra_questions(scene, ["count_present"])
    stored = [{"type": "count", "q": "How many objects are there?", "a": "3"}]
    assert TaskMix(extra_qa=("count_present",)).questions(stored, {"scene": scene.to_json()})[0] == stored[0]


def test_more_counts_and_relations_keep_the_answers_prior_and_repeat_nothing():
    """count_any draws two more colours and two more shapes to count, uniformly, as the stored questions do (so the
    share of zero answers stays the stored one), never a count already asked; relation_more asks up to two more
    relations of uniquely named pairs, yes as often as no, never about the pair the stored relation asks;
    count_every asks every colour and shape (its zero share the stored one too); every answer is the scene's truth;
    the same document rng gives the same questions."""
    import random

    from data.shapes import (Obj, Scene, WorldConfig, _RELATION, extra_questions, plural, questions, sample_scene,
                             scene_rng)
    from fusion.documents import TaskMix

    def obj(colour, shape, row, col):
        return Obj(shape, colour, "small", row, col, 8.0 + 16 * col, 8.0 + 16 * row, 8.0)

    scene = Scene(48, "white", (obj("blue", "square", 0, 0), obj("red", "circle", 2, 1), obj("red", "cross", 1, 2)))
    stored = [{"type": "count", "q": "How many red objects are there?", "a": "2"},
              {"type": "position", "q": "Is the square left of the circle?", "a": "yes"}]
    asked = [q["q"] for q in stored]
    for seed in range(50):
        extra = extra_questions(scene, ["count_any", "relation_more"], random.Random(seed), asked=asked)
        counts = [q for q in extra if q["type"] == "count"]
        relations = [q for q in extra if q["type"] == "position"]
        assert len(counts) == 4 and len(relations) == 2 and len({q["q"] for q in extra}) == 6
        assert "How many red objects are there?" not in {q["q"] for q in counts}
        for q in relations:  # not the stored pair, in either order
            assert {_RELATION.match(q["q"]).group(1), _RELATION.match(q["q"]).group(3)} != {"the square", "the circle"}
    assert extra_questions(scene, ["count_any"], random.Random(3)) == extra_questions(scene, ["count_any"],
                                                                                       random.Random(3))
    assert extra_questions(Scene(48, "black", ()), ["relation_more"]) == []
    every = extra_questions(scene, ["count_every", "count_any"], random.Random(3), asked=asked)
    assert len(every) == 6 + 5 - 1 and "How many red objects are there?" not in {q["q"] for q in every}
    assert {q["q"]: q["a"] for q in every if q["a"] != "0"} == {
        "How many blue objects are there?": "1", "How many squares are there?": "1",
        "How many circles are there?": "1", "How many crosses are there?": "1"}

    # over generated scenes: answers are the truth, zero answers as common as in the stored counts by attribute,
    # relations answered yes about half the time
    world = WorldConfig()
    rng = random.Random(0)
    zero = {"stored": [], "extra": []}
    yes = []
    for i in range(400):
        sc = sample_scene(world, "train", i)
        by_attr = [q for q in questions(sc, scene_rng(world, "train/lang", i))
                   if q["type"] == "count" and q["q"] != "How many objects are there?"]
        zero["stored"] += [q["a"] == "0" for q in by_attr]
        for q in extra_questions(sc, ["count_any" if i % 2 else "count_every", "relation_more"], rng):
            if q["type"] == "count":
                words = q["q"].split()[2:-2]
                truth = sc.count(colour=words[0]) if words[-1] == "objects" else \
                    sum(plural(o.shape) == words[0] for o in sc.objects)
                assert q["a"] == str(truth)
                zero["extra"].append(q["a"] == "0")
            else:
                m = _RELATION.match(q["q"])
                a, b = (next(o for o in sc.objects if m.group(k).split()[1:] in ([o.shape], [o.colour, o.shape]))
                        for k in (1, 3))
                truth = a.col < b.col if m.group(2) == "left of" else a.row < b.row
                assert q["a"] == ("yes" if truth else "no")
                yes.append(truth)
    share = {k: sum(v) / len(v) for k, v in zero.items()}
    assert abs(share["extra"] - share["stored"]) < 0.08, share
    assert 0.4 < sum(yes) / len(yes) < 0.6 and len(yes) > 300
    meta = {"scene": scene.to_json()}
    mix = TaskMix(extra_qa=("count_any", "relation_more"), max_qa=16)
    assert mix.questions(stored, meta, random.Random(1)) == mix.questions(stored, meta, random.Random(1))
    assert mix.questions(stored, meta, random.Random(1))[:2] == stored


def test_reading_documents_train_on_their_image_only_when_asked(vocab):
    import random

    from fusion.documents import TaskMix, make_document

    qa = [{"type": "colour", "q": "What colour is the circle?", "a": "red"}]
    for read_image_loss, image_targets in ((False, 0), (True, vocab.layout.span_len)):
        mix = TaskMix(read_image_loss=read_image_loss)
        for task in ("vqa", "caption"):
            doc = tokenize(vocab, make_document(task, random_codes(vocab), "A red circle.", qa, random.Random(0), mix))
            p = pack([doc], 512, vocab.pad)
            assert int(((p.labels != IGNORE) & (p.modality == 1)).sum()) == image_targets, task


def test_question_first_puts_the_first_question_before_the_image_and_the_evaluation_asks_the_same_way(vocab):
    import random

    from fusion.checkpoint import Bundle
    from fusion.documents import TaskMix, make_document
    from fusion.evaluate import reading_prompt

    qa = [{"type": "colour", "q": "What colour is the circle?", "a": "red"},
          {"type": "shape", "q": "What shape is the red object?", "a": "circle"}]
    codes = random_codes(vocab)
    for first in (False, True):
        segs = make_document("vqa", codes, "A red circle.", qa, random.Random(0), TaskMix(question_first=first))
        kinds = ["image" if s.text is None else "text" for s in segs]
        assert kinds.index("image") == (1 if first else 0) and len(segs) == 5  # image + 2 x (question, answer)
        assert segs[-1].loss and not segs[kinds.index("image")].loss
        doc = tokenize(vocab, segs)
        ask = segs[0 if first else 1].text  # the question the answer after the image (or the next line) answers
        bundle = Bundle(None, vocab, None, meta={"reading": {"question_first": first}})
        ids, _ = reading_prompt(bundle, codes, ask[len("Q: "):-len(" A:")])
        assert doc.ids[:len(ids)] == ids  # the evaluation's prompt is the training document's own prefix


def test_describe_first_writes_every_cell_before_the_questions_and_the_evaluation_asks_after_its_own(vocab):
    """describe_first: vqa documents of a scene put "Scene: <each cell's content>" (a target) between the image
    and the questions; the evaluation's prompt is the same prefix with the model's own description; the
    description is scored cell by cell; question_first cannot be combined with it."""
    import random

    from data.shapes import Obj, Scene, Text, grid_description
    from fusion.checkpoint import Bundle
    from fusion.documents import SCENE_PROMPT, TaskMix, make_document
    from fusion.evaluate import answer_questions, description_accuracy, reading_prompt

    scene = Scene(48, "white", (Obj("square", "red", "small", 0, 0, 8.0, 8.0, 8.0),
                                Obj("circle", "blue", "large", 2, 1, 24.0, 40.0, 13.0)), Text("cat", 1, 1, 24.0, 24.0, 10))
    truth = grid_description(scene)
    assert truth == ("top left: red square top left; top centre: empty; top right: empty; middle left: empty; "
                     "centre: the word cat; middle right: empty; bottom left: empty; bottom centre: blue circle "
                     "bottom centre; bottom right: empty.")
    qa = [{"type": "position", "q": "Where is the square?", "a": "top left"}]
    codes, meta = random_codes(vocab), {"scene": scene.to_json()}
    segs = make_document("vqa", codes, "", qa, random.Random(0), TaskMix(describe_first=True), meta)
    assert [s.text for s in segs[1:]] == [SCENE_PROMPT, f" {truth}\n", "Q: Where is the square? A:", " top left\n"]
    assert [s.loss for s in segs] == [False, False, True, False, True]
    assert len(make_document("vqa", codes, "", qa, random.Random(0), TaskMix(describe_first=True), {})) == 3
    bundle = Bundle(None, vocab, None, meta={"reading": {"describe_first": True}})
    assert bundle.describe_first and not Bundle(None, vocab, None, meta={}).describe_first
    ids, _ = reading_prompt(bundle, codes, "Where is the square?", truth)
    assert tokenize(vocab, segs).ids[:len(ids)] == ids  # the evaluation's prompt is the training document's prefix
    assert description_accuracy([truth], [scene]) == {"cells": 1.0, "whole": 1.0, "images": 1, "examples": [truth]}
    wrong = truth.replace("top left: red square", "top left: red circle")
    assert wrong != truth
    assert description_accuracy([wrong], [scene])["cells"] == pytest.approx(8 / 9)
    assert description_accuracy([wrong], [scene])["whole"] == 0.0
    with pytest.raises(ValueError, match="exclude each other"):
        TaskMix(describe_first=True, question_first=True)
    # scene_qa: the same description and questions without the image, only for samples with a scene
    segs = make_document("scene_qa", None, "", qa, random.Random(0), TaskMix(), meta)
    assert [s.text for s in segs] == [SCENE_PROMPT, f" {truth}\n", "Q: Where is the square? A:", " top left\n"]
    assert [s.loss for s in segs] == [False, False, False, True]
    mix = TaskMix(weights={"t2i": 0.5, "scene_qa": 0.5})
    assert {mix.pick(random.Random(i), has_qa=True) for i in range(20)} == {"t2i"}  # no scene: never scene_qa
    assert "scene_qa" in {mix.pick(random.Random(i), has_qa=True, has_scene=True) for i in range(20)}
    # a (random) describe-first model answers every question, after describing each image once
    model = Bundle(tiny_decoder(vocab).eval(), vocab, None, meta={"reading": {"describe_first": True}})
    answers = answer_questions(model, [(codes, "Where is the square?"), (codes, "What colour is the circle?")])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_restate_referent_names_the_object_again_and_the_evaluation_asks_the_same_way(vocab):
    """restate_referent: a question about one object ends on its name ("A: the red square is"), the answer
    follows; questions about no single object keep "A:"; the evaluation's prompt is the training document's
    prefix; off, the prompt is the plain one."""
    import random

    from fusion.checkpoint import Bundle
    from fusion.documents import TaskMix, make_document, qa_prompt
    from fusion.evaluate import reading_prompt

    assert qa_prompt("Where is the red square?", restate=True) == "Q: Where is the red square? A: the red square is"
    assert qa_prompt("What colour is the square?", restate=True) == "Q: What colour is the square? A: the square is"
    assert qa_prompt("What shape is the red object?", restate=True) == "Q: What shape is the red object? A: the red object is"
    for q in ("How many objects are there?", "Is the square left of the circle?", "What is written in the image?"):
        assert qa_prompt(q, restate=True) == qa_prompt(q) == f"Q: {q} A:"
    qa = [{"type": "position", "q": "Where is the square?", "a": "top left"}]
    codes = random_codes(vocab)
    segs = make_document("vqa", codes, "", qa, random.Random(0), TaskMix(restate_referent=True), {})
    assert [s.text for s in segs[1:]] == ["Q: Where is the square? A: the square is", " top left\n"]
    assert [s.loss for s in segs] == [False, False, True]
    bundle = Bundle(None, vocab, None, meta={"reading": {"restate_referent": True}})
    assert bundle.restate_referent and not Bundle(None, vocab, None, meta={}).restate_referent
    ids, _ = reading_prompt(bundle, codes, "Where is the square?")
    assert tokenize(vocab, segs).ids[:len(ids)] == ids
    plain, _ = reading_prompt(Bundle(None, vocab, None, meta={}), codes, "Where is the square?")
    assert len(plain) < len(ids) and ids[:len(plain)] == plain
