"""Why a model binds badly: probes of a trained decoder on shapes-world scenes (fusion.evaluate, binding_probe).

- Attention to the asked object. At the token that predicts the answer, each head's attention over the image's
  codes is split between the asked object's codes and the other objects' codes; the share on the asked object,
  averaged over questions, for the best head of each block, per kind of question (scenes of 2-3 objects):
  "What colour is the square?" (the object is found by its shape), "What shape is the red object?" (found by its
  colour) and "Where is the square?" (found by its shape or colour and shape). A head that finds the object puts
  most of its object attention there; a head that does not puts about the object's share of the objects' area
  (`area_share`).
- The cell a code sits in, read back from the residual stream: a linear probe per block (the input embedding,
  then after each block) predicts the 3 x 3 cell of the object a code belongs to from that code's hidden state
  alone (every object of every image). A "Where" answer needs the cell to reach the heads that find the object.
- For a describe-first model (TaskMix.describe_first), whether its answers come from its description: "Where"
  questions asked after the true description, and after one with the asked object's cell moved (study screen 9).

The demo model (README, study screen 8): found by colour 0.88, by shape 0.58, "Where" 0.45 against an area share
of 0.43; the cell is read at 100 % from the input, 50 % after block 3 and 32 % at the top.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from data.shapes import Scene, grid_description
from fusion.checkpoint import Bundle
from fusion.evaluate import CELLS, describe_images, greedy_lines, reading_prompt

KINDS = {"find_by_shape": "What colour is the ", "find_by_colour": "What shape is the ", "where": "Where is the "}


def asked_object(scene: Scene, question: str):
    """(kind, the object the question is about) for the three probed kinds, or None."""
    for kind, head in KINDS.items():
        if not question.startswith(head):
            continue
        words = question[len(head):-1].split()
        if kind == "find_by_colour":  # "What shape is the red object?"
            found = [o for o in scene.objects if o.colour == words[0]]
        elif len(words) == 1:  # "the square"
            found = [o for o in scene.objects if o.shape == words[0]]
        else:  # "the red square"
            found = [o for o in scene.objects if o.colour == words[0] and o.shape == words[1]]
        return (kind, found[0]) if len(found) == 1 else None
    return None


def code_mask(scene: Scene, obj, cells: np.ndarray, grid: int) -> np.ndarray:
    """[T] bool: the image codes whose patch centre lies inside the object's bounding box (cells: [T, 2],
    1-based row / column of each code, 0 elsewhere: Decoder.grid_cells)."""
    px = scene.resolution / grid
    row, col = cells[:, 0] - 1, cells[:, 1] - 1
    return ((cells[:, 0] > 0) & (np.abs((col + 0.5) * px - obj.cx) <= obj.extent / 2)
            & (np.abs((row + 0.5) * px - obj.cy) <= obj.extent / 2))


def _forward(dec, ids: list[int]):
    t = torch.tensor([ids], device=dec.embed_tokens.weight.device)
    extra = dec.block_kwargs(dec.layer_pos(t), dec.layer_cells(t))
    return dec.lm(inputs_embeds=dec.embed(t), output_attentions=True, output_hidden_states=True, **extra), t


@torch.no_grad()
def binding_probe(bundle: Bundle, samples: list[dict], min_objects: int = 2, max_objects: int = 3,
                  seed: int = 0) -> dict:
    """The probes on `samples` (eval_samples: codes + meta with the scene and its questions)."""
    dec, grid = bundle.decoder.eval(), bundle.vocab.layout.grid
    # a describe-first model is asked after the description it wrote (the answer's attention is still measured on
    # the image's codes)
    written = describe_images(bundle, [s["image"] for s in samples]) if bundle.describe_first else [None] * len(samples)
    configs = [m.config for m in dec.lm.modules() if hasattr(m, "config")]
    before = [c._attn_implementation for c in configs]
    for c in configs:  # attention weights need the eager kernel
        c._attn_implementation = "eager"
    shares = {k: [] for k in KINDS}
    area = {k: [] for k in KINDS}
    states, labels = [], []
    try:
        for s, description in zip(samples, written):
            scene = Scene.from_json(s["meta"]["scene"])
            asked = min_objects <= len(scene.objects) <= max_objects
            for qa in s["meta"]["qa"] if asked else []:
                found = asked_object(scene, qa["q"])
                if found is None:
                    continue
                kind, obj = found
                ids, _ = reading_prompt(bundle, s["image"], qa["q"], description)
                out, t = _forward(dec, ids)
                cells = dec.grid_cells(t)[0].cpu().numpy()
                target = code_mask(scene, obj, cells, grid)
                others = np.any([code_mask(scene, o, cells, grid) for o in scene.objects if o is not obj], 0) & ~target
                if not target.any() or not others.any():
                    continue
                per_layer = []
                for a in out.attentions:  # [1, heads, T, T]: the last query predicts the answer's first token
                    w = a[0, :, -1].float().cpu().numpy()
                    on, off = w[:, target].sum(1), w[:, others].sum(1)
                    per_layer.append(on / np.maximum(on + off, 1e-9))
                shares[kind].append(per_layer)  # [blocks, heads]
                area[kind].append(target.sum() / (target.sum() + others.sum()))
            # the cell probe: every code of every object, once per image
            ids, _ = reading_prompt(bundle, s["image"], "Where is it?")
            out, t = _forward(dec, ids)
            cells = dec.grid_cells(t)[0].cpu().numpy()
            hs = torch.stack(out.hidden_states)[:, 0].float().cpu()  # [blocks + 1, T, h]
            for o in scene.objects:
                for i in np.flatnonzero(code_mask(scene, o, cells, grid)):
                    states.append(hs[:, i])
                    labels.append(o.row * 3 + o.col)
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
    report = {"attention_share_best_head": {
        k: {"questions": len(v), "per_block": np.mean(v, 0).max(1).round(3).tolist() if v else [],
            "area_share": round(float(np.mean(area[k])), 3) if v else None} for k, v in shares.items()}}
    report["cell_from_code"] = cell_probe(torch.stack(states), torch.tensor(labels), seed) if states else []
    report["codes"] = len(labels)
    if bundle.describe_first:
        report["description"] = description_probe(bundle, samples, seed)
    return report


def description_probe(bundle: Bundle, samples: list[dict], seed: int = 0) -> dict:
    """Does a describe-first model answer from its description? The "Where is ...?" questions of scenes of two or
    more objects, asked after the scene's true description (data.shapes.grid_description), then after the same
    description with the asked object's cell (the one named after it) moved to another cell: the share right
    given the true text, and of the moved answers the share that follows the text (chance 1/8) or keeps the
    image's cell."""
    rng = random.Random(seed)
    cells = list(CELLS)  # every cell's name, in reading order
    true_prompts, moved_prompts, truth, moved_to = [], [], [], []
    for s in samples:
        scene = Scene.from_json(s["meta"]["scene"])
        if len(scene.objects) < 2:
            continue
        text = grid_description(scene)
        for qa in s["meta"]["qa"]:
            found = asked_object(scene, qa["q"])
            if found is None or found[0] != "where":
                continue
            obj = found[1]
            other = rng.choice([c for c in cells if c != obj.position])
            named = f"{obj.colour} {obj.shape} {obj.position}"
            true_prompts.append(reading_prompt(bundle, s["image"], qa["q"], text))
            moved_prompts.append(reading_prompt(bundle, s["image"], qa["q"],
                                                text.replace(named, f"{obj.colour} {obj.shape} {other}")))
            truth.append(obj.position)
            moved_to.append(other)
    if not truth:
        return {}
    given = greedy_lines(bundle, true_prompts, 8, 32)
    moved = greedy_lines(bundle, moved_prompts, 8, 32)
    n = len(truth)
    return {"questions": n, "right_given_true_text": sum(a == y for a, y in zip(given, truth)) / n,
            "moved_follows_text": sum(a == m for a, m in zip(moved, moved_to)) / n,
            "moved_keeps_image": sum(a == y for a, y in zip(moved, truth)) / n}


def cell_probe(states: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 300) -> list[float]:
    """states [N, blocks + 1, h], labels [N] (cell 0-8): held-out accuracy of a linear probe per block."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, test = perm[: n * 3 // 4], perm[n * 3 // 4:]
    acc = []
    for layer in range(states.shape[1]):
        x = states[:, layer]
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-5)
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], 9)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                loss = (torch.nn.functional.cross_entropy(probe(x[train]), labels[train])
                        + 1e-3 * probe.weight.pow(2).sum())
                opt.zero_grad()
                loss.backward()
                opt.step()
        acc.append(round(float((probe(x[test]).argmax(1) == labels[test]).float().mean()), 3))
    return acc


def summary_lines(report: dict) -> list[str]:
    att = report["attention_share_best_head"]
    parts = [f"{k.replace('_', ' ')} {max(v['per_block']):.2f} (area {v['area_share']:.2f})"
             for k, v in att.items() if v["per_block"]]
    cells = report["cell_from_code"]
    lines = ["binding probe         asked object's share of the best head's object attention: " + "  ".join(parts)]
    if cells:
        lines.append("                      a code's cell read from its residual, input -> top: "
                     + " ".join(f"{c:.0%}" for c in cells))
    d = report.get("description") or {}
    if d:
        lines.append(f"                      \"Where\" after the true description {d['right_given_true_text']:.0%}; its "
                     f"cell moved in the text: answers follow {d['moved_follows_text']:.0%} (chance 12%), keep the "
                     f"image's {d['moved_keeps_image']:.0%}")
    return lines
