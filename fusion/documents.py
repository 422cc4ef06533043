"""Training documents from code-shard samples: the task mix that teaches one model to read and to write.

Every sample (an image as codes or pixels + caption + the shapes world's QA, when present) becomes one document:
  t2i        caption -> image                (writes images; the caption is emptied now and then for CFG)
  caption    image -> caption                (reads images)
  vqa        image -> Q: .. A: .. per line   (reads images; loss on the answers, and on the codes if read_image_loss;
                                             question_first: the first question comes before the image;
                                             describe_first: "Scene: <every cell's content>" before the questions)
  interleave caption -> image -> Q/A         (text, image, text in one document)
  text       caption alone                   (plain language modelling)
  scene_qa   "Scene: <every cell>" -> Q/A    (shapes world, no image: answers read from a description; teaches the
                                             copy a describe-first model needs after it has described an image)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np

from fusion.sequences import Segment

TASKS = ("t2i", "caption", "vqa", "interleave", "text", "scene_qa")


# the object a question is about, as the question names it: "What colour is the square?" -> "the square"
REFERENT = re.compile(r"^(?:What colour is|What shape is|Where is) (the [a-z ]+)\?$")


def qa_prompt(question: str, restate: bool = False) -> str:
    """"Q: <question> A:"; with `restate` (TaskMix.restate_referent) a question about one object goes on with its
    name, "Q: Where is the red square? A: the red square is", so every such question ends on the same words
    whatever it asks (colour, shape or place) and the answer follows the object's name."""
    if restate:
        m = REFERENT.match(question)
        if m:
            return f"Q: {question} A: {m.group(1)} is"
    return f"Q: {question} A:"


SCENE_PROMPT = "Scene:"


def description_segments(description: str, loss: bool) -> list[Segment]:
    """What follows the image when a model describes first: the prompt, then the description (its own line)."""
    return [Segment.txt(SCENE_PROMPT, loss=False), Segment.txt(f" {description}\n", loss=loss)]


def reading_segments(image_segment: Segment, question: str, question_first: bool = False,
                     description: str | None = None, restate: bool = False) -> list[Segment]:
    """An image and a question, in the order a model reads them (its training's `question_first`; with the
    description it wrote of the image first when it was trained to describe first; the question's object named
    again after "A:" when it was trained to restate it)."""
    q = Segment.txt(qa_prompt(question, restate), loss=False)
    if question_first:
        return [q, image_segment]
    described = description_segments(description, loss=False) if description is not None else []
    return [image_segment, *described, q]


def qa_answer(answer: str) -> str:
    return f" {answer}\n"


@dataclass
class TaskMix:
    weights: dict[str, float] = field(default_factory=lambda: {"t2i": 0.45, "caption": 0.1, "vqa": 0.35,
                                                               "interleave": 0.05, "text": 0.05})
    cond_dropout: float = 0.1  # share of t2i prompts emptied, so classifier-free guidance has an unconditional model
    max_qa: int = 12
    # image -> caption documents rewrite the caption in this template of the shapes world (0 names every
    # object's size, colour, shape and cell) when the sample carries its scene; None: the caption as stored
    caption_template: int | None = None
    # curriculum: the first `curriculum_documents` documents (per data stream) come only from scenes with at
    # most `curriculum_max_objects` objects; the other samples are read and passed over. 0: off
    curriculum_documents: int = 0
    curriculum_max_objects: int = 1
    # > 0: the bound grows by one object every `curriculum_step_documents` documents (1, then 2, ... objects)
    curriculum_step_documents: int = 0
    # image -> text documents (caption, vqa) also train on their image's codes, unconditionally (Chameleon and
    # Emu3 train on every token): predicting an object's next code without a caption needs what reading needs,
    # features at the image's own positions that say what each object is. False: loss on the text only
    read_image_loss: bool = False
    # vqa documents ask their first question before the image ("Q: .. A:" <image> " answer"), so the codes are
    # read knowing what is asked (the rest follow the image as usual); the evaluation asks the same way
    question_first: bool = False
    # shapes world: training-only questions made from the sample's scene and added to its vqa documents
    # (data.shapes.extra_questions, e.g. "where_by_colour"); the evaluation asks the stored questions only
    extra_qa: tuple[str, ...] = ()
    # shapes world: vqa documents describe the image cell by cell before the questions ("Scene: top left: red
    # square; top centre: empty; ..." with loss, data.shapes.grid_description); the evaluation lets the model
    # write its description first, then asks each question after it
    describe_first: bool = False
    # questions about one object name it again after "A:" ("A: the red square is top left"): see qa_prompt;
    # the evaluation asks the same way
    restate_referent: bool = False
    # shapes world: relation and count answers carry their working, "the red square is top left, the circle is
    # centre: yes" / "top left, bottom right: 2" (data.shapes.worked_answer); the evaluation lets the model write
    # its working and scores what follows the last ": "; a tuple of kinds ("relation", "count"), empty for none
    worked_answers: tuple[str, ...] = ()
    # a schedule of mixes over training: ((step, weights), ...) - from each `step` on (the global training step of
    # the batch a document lands in, data.loader.StreamClock) documents are drawn with these weights instead
    phases: tuple[tuple[int, dict[str, float]], ...] = ()
    # training-step windows [start, end) whose documents come only from scenes of at most curriculum_max_objects
    # objects, in whatever epoch they fall (task_phases' `curriculum`: a new mix meets small scenes first)
    curriculum_windows: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        for weights in (self.weights, *(w for _, w in self.phases)):
            unknown = set(weights) - set(TASKS)
            if unknown:
                raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
            if not any(w > 0 for w in weights.values()):
                raise ValueError(f"a task mix needs a task with weight > 0, got {dict(weights)}")
        steps = [s for s, _ in self.phases]
        if any(s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"task phases start at increasing steps >= 1, got {steps}")
        if any(not 0 <= a < b for a, b in self.curriculum_windows):
            raise ValueError(f"curriculum windows are step ranges [start, end), got {list(self.curriculum_windows)}")
        if self.caption_template is not None and self.caption_template not in range(4):
            raise ValueError(f"caption_template must be 0-3 or null, got {self.caption_template!r}")
        if self.curriculum_documents < 0 or self.curriculum_max_objects < 1 or self.curriculum_step_documents < 0:
            raise ValueError("curriculum needs documents >= 0, max_objects >= 1 and step_documents >= 0, got "
                             f"{self.curriculum_documents} / {self.curriculum_max_objects} / "
                             f"{self.curriculum_step_documents}")
        if self.describe_first and self.question_first:
            raise ValueError("describe_first and question_first exclude each other (the description follows the image)")
        if self.worked_answers:
            from data.shapes import worked_kinds

            self.worked_answers = worked_kinds(self.worked_answers)  # true -> both kinds; an unknown one fails here
        if self.extra_qa:
            from data.shapes import EXTRA_QUESTIONS

            unknown = set(self.extra_qa) - set(EXTRA_QUESTIONS)
            if unknown:
                raise ValueError(f"unknown extra_qa {sorted(unknown)}; known: {EXTRA_QUESTIONS}")

    def in_curriculum(self, meta: dict, documents_so_far: int) -> bool:
        """False for a sample the curriculum passes over at this point of the stream."""
        if documents_so_far >= self.curriculum_documents:
            return True
        scene = meta.get("scene")
        bound = self.curriculum_max_objects
        if self.curriculum_step_documents:
            bound += documents_so_far // self.curriculum_step_documents
        return scene is None or len(scene.get("objects") or []) <= bound

    def in_window(self, meta: dict, step: int) -> bool:
        """False for a sample a curriculum window passes over at this training step."""
        if not any(a <= step < b for a, b in self.curriculum_windows):
            return True
        scene = meta.get("scene")
        return scene is None or len(scene.get("objects") or []) <= self.curriculum_max_objects

    def reading_caption(self, caption: str, meta: dict) -> str:
        """The caption an image -> caption document asks for."""
        if self.caption_template is None or not meta.get("scene"):
            return caption
        from data.shapes import Scene, caption as describe

        return describe(Scene.from_json(meta["scene"]), random.Random(0), template=self.caption_template)

    def questions(self, qa: list[dict], meta: dict, rng: random.Random | None = None) -> list[dict]:
        """The stored questions, and the extra ones this mix asks of the sample's scene (if it has one; the
        random kinds draw from `rng`)."""
        if not self.extra_qa or not meta.get("scene"):
            return qa
        from data.shapes import Scene, extra_questions

        return [*qa, *extra_questions(Scene.from_json(meta["scene"]), self.extra_qa, rng,
                                      asked=[item["q"] for item in qa])]

    def answered(self, qa: list[dict], meta: dict) -> list[dict]:
        """The questions with the answers this mix trains on: with their working when `worked_answers` and the
        sample has its scene, else as stored."""
        if not self.worked_answers or not meta.get("scene"):
            return qa
        from data.shapes import Scene, worked_answer

        scene = Scene.from_json(meta["scene"])
        return [{**item, "a": worked_answer(scene, item["q"], item["a"], self.worked_answers)} for item in qa]

    def weights_at(self, step: int) -> dict[str, float]:
        """The task weights documents are drawn with at this training step."""
        weights = self.weights
        for start, w in self.phases:
            if step >= start:
                weights = w
        return weights

    def pick(self, rng: random.Random, has_qa: bool, has_scene: bool = False, step: int = 0) -> str | None:
        """A task for this sample, or None when the mix has none it can make (a VQA-only mix, a sample
        without questions): the sample is passed over."""
        weights = self.weights_at(step)
        tasks = [t for t, w in weights.items() if w > 0 and (has_qa or t not in ("vqa", "interleave", "scene_qa"))
                 and (has_scene or t != "scene_qa")]
        return rng.choices(tasks, weights=[weights[t] for t in tasks])[0] if tasks else None


def qa_segments(qa: list[dict], rng: random.Random, max_qa: int, restate: bool = False) -> list[Segment]:
    qa = rng.sample(qa, min(len(qa), max_qa))
    out: list[Segment] = []
    for item in qa:
        out += [Segment.txt(qa_prompt(item["q"], restate), loss=False), Segment.txt(qa_answer(item["a"]), loss=True)]
    return out


def make_document(task: str, image, caption: str, qa: list[dict], rng: random.Random,
                  mix: TaskMix, meta: dict | None = None) -> list[Segment]:
    if task == "t2i":
        prompt = "" if rng.random() < mix.cond_dropout else caption
        return [Segment.txt(prompt, loss=False), Segment.img(image, loss=True)]
    if task == "caption":
        return [Segment.img(image, loss=mix.read_image_loss), Segment.txt(mix.reading_caption(caption, meta or {}),
                                                                          loss=True)]
    if task == "vqa":
        qas = qa_segments(mix.answered(mix.questions(qa, meta or {}, rng), meta or {}), rng, mix.max_qa,
                          mix.restate_referent)
        if mix.question_first and qas:
            return [qas[0], Segment.img(image, loss=mix.read_image_loss), *qas[1:]]
        described = []
        if mix.describe_first and (meta or {}).get("scene"):
            from data.shapes import Scene, grid_description

            described = description_segments(grid_description(Scene.from_json(meta["scene"])), loss=True)
        return [Segment.img(image, loss=mix.read_image_loss), *described, *qas]
    if task == "interleave":
        return [Segment.txt(caption, loss=False), Segment.img(image, loss=True),
                *qa_segments(mix.answered(qa, meta or {}), rng, 3, mix.restate_referent)]
    if task == "text":
        return [Segment.txt(caption, loss=True)]
    if task == "scene_qa":
        from data.shapes import Scene, grid_description

        description = grid_description(Scene.from_json((meta or {})["scene"]))
        asked = mix.answered(mix.questions(qa, meta or {}, rng), meta or {})
        return [*description_segments(description, loss=False), *qa_segments(asked, rng, mix.max_qa, mix.restate_referent)]
    raise ValueError(f"unknown task {task!r}")
