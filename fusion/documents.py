"""Training documents from code-shard samples: the task mix that teaches one model to read and to write.

Every sample (an image as codes or pixels + caption + the shapes world's QA, when present) becomes one document:
  t2i        caption -> image                (writes images; the caption is emptied now and then for CFG)
  caption    image -> caption                (reads images)
  vqa        image -> Q: .. A: .. per line   (reads images; loss on the answers only)
  interleave caption -> image -> Q/A         (text, image, text in one document)
  text       caption alone                   (plain language modelling)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from fusion.sequences import Segment

TASKS = ("t2i", "caption", "vqa", "interleave", "text")


def qa_prompt(question: str) -> str:
    return f"Q: {question} A:"


def qa_answer(answer: str) -> str:
    return f" {answer}\n"


@dataclass
class TaskMix:
    weights: dict[str, float] = field(default_factory=lambda: {"t2i": 0.45, "caption": 0.1, "vqa": 0.35,
                                                               "interleave": 0.05, "text": 0.05})
    cond_dropout: float = 0.1  # share of t2i prompts emptied, so classifier-free guidance has an unconditional model
    max_qa: int = 12

    def __post_init__(self):
        unknown = set(self.weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")

    def pick(self, rng: random.Random, has_qa: bool) -> str:
        tasks = [t for t, w in self.weights.items() if w > 0 and (has_qa or t not in ("vqa", "interleave"))]
        return rng.choices(tasks, weights=[self.weights[t] for t in tasks])[0]


def qa_segments(qa: list[dict], rng: random.Random, max_qa: int) -> list[Segment]:
    qa = rng.sample(qa, min(len(qa), max_qa))
    out: list[Segment] = []
    for item in qa:
        out += [Segment.txt(qa_prompt(item["q"]), loss=False), Segment.txt(qa_answer(item["a"]), loss=True)]
    return out


def make_document(task: str, image, caption: str, qa: list[dict], rng: random.Random,
                  mix: TaskMix) -> list[Segment]:
    if task == "t2i":
        prompt = "" if rng.random() < mix.cond_dropout else caption
        return [Segment.txt(prompt, loss=False), Segment.img(image, loss=True)]
    if task == "caption":
        return [Segment.img(image, loss=False), Segment.txt(caption, loss=True)]
    if task == "vqa":
        return [Segment.img(image, loss=False), *qa_segments(qa, rng, mix.max_qa)]
    if task == "interleave":
        return [Segment.txt(caption, loss=False), Segment.img(image, loss=True), *qa_segments(qa, rng, 3)]
    if task == "text":
        return [Segment.txt(caption, loss=True)]
    raise ValueError(f"unknown task {task!r}")
