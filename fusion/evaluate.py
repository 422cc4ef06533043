"""Evaluate a trained model on held-out scenes: `python -m fusion.evaluate model_dir=RUN/model codes=CODES`.

Reading: VQA exact-match accuracy per question type (greedy answers), caption cross-entropy,
perplexity and token accuracy, text-only cross-entropy. Writing: text-to-image samples from
held-out prompts, parsed and checked by the judge per prompt type. Writes evaluation.json and
PNG grids (one row per prompt type) next to it.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.grid import save_grid, save_labelled, to_pil
from data.runtime import UserError, cli, inference_dtype, run_dir_of, save_resolved_config, write_json, write_jsonl
from data.shapes import (COLOURS, COLS, ROWS, SHAPES, Scene, WorldConfig, caption, description_entropy, final_answer,
                         grid_description, position_name, world_of)
from fusion.checkpoint import Bundle, load_bundle
from data.loader import ImageTransform
from data.shards import iter_samples
from fusion.adapter import insert_image_features
from fusion.data import iter_code_samples
from fusion.decoder import lm_losses
from fusion.documents import SCENE_PROMPT, reading_segments
from fusion.generate import Generator, SamplingConfig
from data.judge import PROMPT_TYPES, make_prompts, score
from fusion.sequences import Packer, Segment, tokenize


def eval_samples(bundle: Bundle, codes_pattern: str, images_pattern: str | None, limit: int) -> list[dict]:
    """Held-out samples with their image as the model reads it: codes (early fusion) or pixels (adapter)."""
    v, out = bundle.vocab, []
    if bundle.arm == "fusion":
        source = ({**s, "image": s["codes"]} for s in iter_code_samples(codes_pattern, v.layout.grid, v.num_codes))
    else:
        if not images_pattern:
            raise UserError("the adapter reads pixels: set the data split's image shards (data.test, data.holdout)")
        transform = ImageTransform(bundle.image_encoder.cfg.image_size)
        source = ({**s, "image": transform(s["image"])} for s in iter_samples(images_pattern))
    for s in source:
        out.append(s)
        if len(out) >= limit:
            break
    if not out:
        raise UserError(f"no samples in {codes_pattern if bundle.arm == 'fusion' else images_pattern!r}")
    return out


def reading_prompt(bundle: Bundle, image, question: str, description: str | None = None) -> tuple[list[int], list]:
    """The prompt whose continuation is the answer (`description`: what a describe-first model wrote first)."""
    segs = reading_segments(Segment.img(image, loss=False), question, bundle.question_first, description,
                            bundle.restate_referent)
    doc = tokenize(bundle.vocab, segs, add_eos=False, placeholders=bundle.placeholders)
    return doc.ids, doc.images


def greedy_lines(bundle: Bundle, prompts: list[tuple[list[int], list]], max_new_tokens: int,
                 batch_size: int = 32) -> list[str]:
    """Greedy text continuations of (ids, images) prompts, each to the end of its line."""
    v, gen = bundle.vocab, Generator(bundle.decoder, bundle.vocab, bundle.image_encoder)
    sc = SamplingConfig(temperature=0, allow_images=False, stop_at_newline=True, max_new_tokens=max_new_tokens)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, images = zip(*prompts[i:i + batch_size])
        done = gen.generate(list(ids), sc, images=list(images) if bundle.arm == "adapter" else None)
        out += [v.decode_text(o).strip() for o in done]
    return out


def describe_images(bundle: Bundle, images: list, batch_size: int = 32) -> list[str]:
    """What a describe-first model writes after "Scene:" for each image (greedy, one line)."""
    prompts = []
    for im in images:
        doc = tokenize(bundle.vocab, [Segment.img(im, loss=False), Segment.txt(SCENE_PROMPT, loss=False)],
                       add_eos=False, placeholders=bundle.placeholders)
        prompts.append((doc.ids, doc.images))
    return greedy_lines(bundle, prompts, 128, batch_size)


def answer_questions(bundle: Bundle, items: list[tuple[object, str]], batch_size: int = 32,
                     described: dict[int, str] | None = None) -> list[str]:
    """Greedy answers to (image, question) pairs; the image is codes or pixels, as the model reads it. A model
    trained to describe first answers after its own description of the image (`described`: id(image) -> what
    it wrote; written here, once per image, when not given)."""
    if bundle.describe_first and described is None:
        unique = list({id(im): im for im, _ in items}.values())
        described = dict(zip(map(id, unique), describe_images(bundle, unique, batch_size)))
    described = described or {}
    prompts = [reading_prompt(bundle, im, q, described.get(id(im))) for im, q in items]
    return greedy_lines(bundle, prompts, 48 if bundle.worked_answers else 8, batch_size)


def description_accuracy(written: list[str], scenes: list[Scene]) -> dict:
    """Descriptions a model wrote against the scenes' own (data.shapes.grid_description): the share of cells
    whose content it names right (empty, the object's colour and shape, the word) and of images right in every
    cell."""
    cells = whole = 0
    for text, scene in zip(written, scenes):
        truth = grid_description(scene).rstrip(".").split("; ")
        got = text.rstrip(".").split("; ")
        right = sum(a == b for a, b in zip(truth, got))
        cells += right
        whole += right == len(truth) == len(got)
    n = max(len(scenes), 1)
    return {"cells": cells / (9 * n), "whole": whole / n, "images": len(scenes), "examples": written[:3]}


CELLS = {position_name(r, c): (r, c) for r in range(len(ROWS)) for c in range(len(COLS))}  # answer -> (row, col)
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(CELLS)}


def in_scene(scene: Scene, kind: str) -> set[str]:
    """The answers a colour / shape / "Where is ..." question could take from any object of the scene."""
    return {getattr(o, kind) for o in scene.objects} if kind in ANSWERS else set()


def vqa_accuracy(bundle: Bundle, samples: list[dict], max_questions: int) -> dict:
    """Accuracy per question type (`records`: every question with its truth and answer, which evaluate() writes to
    vqa_{split}_answers.jsonl, not into evaluation.json); `wrong_in_scene` per type: the share of wrong answers that
    name what another object of the same scene is (its colour, shape or cell), beside `wrong_in_scene_chance`, that
    share for wrong answers drawn at random: well above chance means the model sees the attributes but binds them
    to the wrong object; at chance, that it does not see them."""
    items, truth, kinds, options, n_objects = [], [], [], [], []
    for s in samples:
        scene = Scene.from_json(s["meta"]["scene"]) if s["meta"].get("scene") else None
        for qa in s["meta"].get("qa") or []:
            items.append((s["image"], qa["q"]))
            truth.append(qa["a"])
            kinds.append(qa["type"])
            n_objects.append(len(scene.objects) if scene is not None else 0)
            where = qa["type"] != "position" or qa["q"].startswith("Where")
            options.append(in_scene(scene, qa["type"]) if scene is not None and where else set())
    items, truth, kinds = items[:max_questions], truth[:max_questions], kinds[:max_questions]
    if not items:
        return {}
    t = time.perf_counter()
    described, description = None, None
    if bundle.describe_first:  # each image described once: its questions are asked after what the model wrote
        asked = {id(im) for im, _ in items}
        shown = [s for s in samples if id(s["image"]) in asked]
        written = describe_images(bundle, [s["image"] for s in shown])
        described = {id(s["image"]): w for s, w in zip(shown, written)}
        scenes = [(Scene.from_json(s["meta"]["scene"]), w) for s, w in zip(shown, written) if s["meta"].get("scene")]
        description = description_accuracy([w for _, w in scenes], [sc for sc, _ in scenes]) if scenes else None
    written = answer_questions(bundle, items, described=described)
    answers = [final_answer(a) for a in written] if bundle.worked_answers else written
    elapsed = time.perf_counter() - t
    right, total, wrong = defaultdict(int), defaultdict(int), defaultdict(int)
    wrong_in, chance = defaultdict(float), defaultdict(float)
    for a, y, k, opts in zip(answers, truth, kinds, options):
        right[k] += int(a == y)
        total[k] += 1
        if opts and a != y:
            wrong[k] += 1
            wrong_in[k] += a in opts
            chance[k] += len(opts - {y}) / (len(ANSWERS[k]) - 1)
    records = [{"type": k, "q": q, "truth": y, "answer": a, **({"written": w} if w != a else {})}
               for (_, q), y, a, w, k in zip(items, truth, answers, written, kinds)]
    examples = [{k: v for k, v in r.items() if k != "type"} for r in records[:10]]
    return {"accuracy": sum(right.values()) / len(answers), "questions": len(answers),
            "per_type": {k: right[k] / total[k] for k in sorted(total)}, "n_per_type": dict(sorted(total.items())),
            "wrong_in_scene": {k: wrong_in[k] / wrong[k] for k in sorted(wrong)},
            "wrong_in_scene_chance": {k: chance[k] / wrong[k] for k in sorted(wrong)},
            "position_detail": position_detail([q for _, q in items], truth, answers, kinds, n_objects),
            "count_detail": count_detail([q for _, q in items], truth, answers, kinds),
            "answers_per_s": round(len(answers) / elapsed, 1), "examples": examples, "records": records,
            **({"description": description} if description else {})}



def position_detail(questions: list[str], truth: list[str], answers: list[str], kinds: list[str],
                    n_objects: list[int]) -> dict:
    """Where position reading fails. "Where is X?": the share with the row right and with the column right, for
    scenes of one object (no binding needed) and of more; "Is A left of / above B?": accuracy and the share
    answered "yes" (half the truths are yes, so ~100 % or ~0 % means the answer ignores the image)."""
    where = {"single": defaultdict(int), "several": defaultdict(int)}
    rel = defaultdict(int)
    for q, y, a, k, n in zip(questions, truth, answers, kinds, n_objects):
        if k != "position":
            continue
        if y in CELLS:
            w = where["single" if n == 1 else "several"]
            got = CELLS.get(a)
            w["n"] += 1
            w["right"] += a == y
            w["row"] += got is not None and got[0] == CELLS[y][0]
            w["column"] += got is not None and got[1] == CELLS[y][1]
        else:
            rel["n"] += 1
            rel["right"] += a == y
            rel["yes"] += a == "yes"
    out = {f"where_{name}": {"questions": w["n"], **{m: w[m] / w["n"] for m in ("right", "row", "column")}}
           for name, w in where.items() if w["n"]}
    if rel["n"]:
        out["relation"] = {"questions": rel["n"], "right": rel["right"] / rel["n"], "said_yes": rel["yes"] / rel["n"]}
    return out


def count_detail(questions: list[str], truth: list[str], answers: list[str], kinds: list[str]) -> dict:
    """Where counting fails: accuracy per form ("How many objects", "How many red objects", "How many
    squares") and per true count, and the share of wrong answers that are off by one. Counting every object
    needs no binding; counting one colour or shape needs the attribute bound to each object."""
    forms, by_truth = defaultdict(lambda: defaultdict(int)), defaultdict(lambda: defaultdict(int))
    wrong = off_by_one = 0
    for q, y, a, k in zip(questions, truth, answers, kinds):
        if k != "count":
            continue
        form = "objects" if q == "How many objects are there?" else ("colour" if q.endswith(" objects are there?")
                                                                     else "shape")
        for tally in (forms[form], by_truth[y]):
            tally["n"] += 1
            tally["right"] += a == y
        if a != y:
            wrong += 1
            off_by_one += a.isdigit() and y.isdigit() and abs(int(a) - int(y)) == 1
    if not forms:
        return {}
    share = lambda t: {"questions": t["n"], "right": t["right"] / t["n"]}  # noqa: E731
    return {"by_form": {f: share(t) for f, t in sorted(forms.items())},
            "by_truth": {y: share(t) for y, t in sorted(by_truth.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 99)},
            "wrong_off_by_one": off_by_one / wrong if wrong else 0.0}


@torch.no_grad()
def teacher_forced(bundle: Bundle, docs: list[list[Segment]], seq_len: int, batch_size: int = 16) -> dict:
    """Per-token cross-entropy and accuracy on the documents' loss-bearing tokens."""
    v, dec = bundle.vocab, bundle.decoder
    packer = Packer(seq_len, v.pad)
    packed = [p for d in docs for p in packer.add(tokenize(v, d, placeholders=bundle.placeholders))] + packer.flush()
    ce_sum = right = n = 0.0
    for i in range(0, len(packed), batch_size):
        chunk = packed[i:i + batch_size]
        batch = {k: torch.stack([torch.from_numpy(getattr(p, k)) for p in chunk]).to(_device(dec))
                 for k in ("input_ids", "labels", "position_ids", "modality", "read_span")}
        inputs = {"input_ids": batch["input_ids"]}
        images = [im for p in chunk for im in p.images]
        if images:
            feats = bundle.image_encoder(torch.stack(images).to(_device(dec)).float() / 255)
            inputs = {"inputs_embeds": insert_image_features(dec.embed_tokens(batch["input_ids"]), batch["input_ids"],
                                                             v.placeholder, feats)}
        logits = dec(**inputs, position_ids=batch["position_ids"], read_span=batch["read_span"]).logits.float()
        mask = batch["labels"] != -100
        r = lm_losses(logits, batch["labels"], batch["modality"], 0.0)
        k = int(mask.sum())
        ce_sum += float(r["loss"]) * k
        right += float((logits.argmax(-1)[mask] == batch["labels"][mask]).sum())
        n += k
    ce = ce_sum / max(n, 1)
    return {"ce": ce, "perplexity": math.exp(min(ce, 50)), "token_accuracy": right / max(n, 1), "tokens": int(n)}


def _device(module) -> torch.device:
    return next(module.parameters()).device


def caption_gain(bundle: Bundle, samples: list[dict], seq_len: int, world: WorldConfig | None = None) -> dict:
    """What the caption is worth to the image, in nats per image: the teacher-forced image cross-entropy
    (summed over the image's tokens) under the empty caption minus under the image's own (`gain_vs_empty`),
    and under another scene's caption minus under its own (`gain`). A model that ignores its prompt scores ~0
    on both.

    `gain_vs_empty` estimates the mutual information between image and caption (training empties some
    prompts, so the empty caption is the model's unconditional image distribution): the mutual information
    cannot exceed the entropy of what the caption says, though the estimate can, a little, where the
    unconditional stream (trained on a tenth of the prompts) models images less well than its conditional
    ones. `gain` also charges the model for being confidently wrong under a wrong prompt, so it grows past
    that (a measure of how strongly the prompt steers, not of information).

    On the shapes world the captions are rewritten in the template that names everything (size, colour,
    shape and cell of every object, the background, the word), and `gain_vs_empty` is set beside the entropy
    of what such a caption fixes (`data.shapes.description_entropy`), the most any model can gain.
    """
    if len(samples) < 2:
        raise ValueError("caption_gain needs at least two samples (one's caption is another's wrong caption)")
    if world is not None and all(s["meta"].get("scene") for s in samples):
        captions = [caption(Scene.from_json(s["meta"]["scene"]), random.Random(0), template=0) for s in samples]
    else:
        captions = [s["caption"] for s in samples]
    others = captions[1:] + captions[:1]  # each image with its neighbour's caption
    per_image = {}
    for name, caps in (("own", captions), ("other", others), ("empty", [""] * len(samples))):
        r = teacher_forced(bundle, [[Segment.txt(c, loss=False), Segment.img(s["image"])] for c, s in zip(caps, samples)],
                           seq_len)
        per_image[name] = r["ce"] * r["tokens"] / len(samples)
    out = {"own_nats": per_image["own"], "other_nats": per_image["other"], "empty_nats": per_image["empty"],
           "gain": per_image["other"] - per_image["own"], "gain_vs_empty": per_image["empty"] - per_image["own"],
           "images": len(samples)}
    if world is not None:
        out["bound"] = description_entropy(world)
        out["fraction_of_bound"] = out["gain_vs_empty"] / out["bound"]
    return out


def generate_images(bundle: Bundle, texts: list[str], sc: SamplingConfig, resolution: int, seed: int = 0,
                    batch_size: int = 16) -> tuple[list, int, float]:
    """Text-to-image for each prompt text: (PIL images, image tokens sampled, seconds)."""
    v, gen = bundle.vocab, Generator(bundle.decoder, bundle.vocab)
    images, t, tokens = [], time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
        ids = [[v.bos, *v.encode_text(text), v.boi] for text in texts[i:i + batch_size]]
        for g in gen.generate(ids, sc, seed=seed + i):
            tokens += len(g)
            try:
                codes = torch.from_numpy(v.decode_image([v.boi, *g]))[None]
                images.append(to_pil(bundle.tokenizer.decode(codes)[0]))
            except ValueError:  # cannot happen under the grid constraint; counted as a failure if it does
                images.append(to_pil(torch.zeros(3, resolution, resolution)))
    return images, tokens, time.perf_counter() - t


def generation_scores(bundle: Bundle, world: WorldConfig, n_per_type: int, sc: SamplingConfig, out_dir: Path | None,
                      seed: int = 0, split: str = "test") -> dict:
    """The judge on images drawn for `n_per_type` prompts of each type; a PNG grid (a row per type) in out_dir."""
    prompts = make_prompts(world, split, n_per_type)
    images, tokens, elapsed = generate_images(bundle, [p.text for p in prompts], sc, world.resolution, seed)
    result = score(images, prompts)
    out = {**result, "image_tokens_per_s": round(tokens / elapsed, 1), "cfg_scale": sc.cfg_scale,
           "temperature": sc.temperature, "top_k": sc.top_k}
    if out_dir is not None:
        rows = [[im for im, p in zip(images, prompts) if p.type == kind][:12] for kind in PROMPT_TYPES]
        out["grid"] = str(save_grid(rows, out_dir / "generation_grid.png", scale=3))
        (out_dir / "generation_prompts.txt").write_text("\n".join(f"{p.type}\t{p.text}" for p in prompts) + "\n")
    return out


def greedy_captions(bundle: Bundle, images: list, max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """What the model says about each image (greedy, after the image, until <eos>). The first token may not be
    <eos>: an image followed by <eos> is also how an unconditional text-to-image document ends."""
    v, gen = bundle.vocab, Generator(bundle.decoder, bundle.vocab, bundle.image_encoder)
    sc = SamplingConfig(temperature=0, allow_images=False, max_new_tokens=max_new_tokens, min_new_tokens=1)
    out = []
    for i in range(0, len(images), batch_size):
        docs = [tokenize(v, [Segment.img(im, loss=False)], add_eos=False, placeholders=bundle.placeholders)
                for im in images[i:i + batch_size]]
        rows = gen.generate([d.ids for d in docs], sc, images=[d.images for d in docs] if bundle.arm == "adapter" else None)
        out += [v.decode_text(r).strip() for r in rows]
    return out


def originals(pattern: str | None, keys: list[str]) -> dict:
    """The source images of these keys, from image shards (empty when there are none)."""
    if not pattern:
        return {}
    want, found = set(keys), {}
    for s in iter_samples(pattern):
        if s["key"] in want:
            found[s["key"]] = s["image"]
            if len(found) == len(want):
                break
    return found


def open_world_report(bundle: Bundle, cfg: DictConfig, codes: Path, out_dir: Path, precision: str) -> dict:
    """Data without a world model (a folder of captioned images, the emoji corpus): caption cross-entropy and
    token accuracy on held-out images, greedy captions beside their images (PNG), images drawn for held-out and
    training captions (PNG), and, with `retrieval.tower_run`, top-1 retrieval of each image's own caption among
    16 by the in-project contrastive model, for the real images, their reconstructions and the generated ones."""
    if bundle.arm != "fusion":
        raise UserError("open-world evaluation (no shapes world) is for the early-fusion arm")
    report: dict = {"model": str(cfg.model_dir), "arm": bundle.arm, "precision": precision, "world": None}
    test = eval_samples(bundle, str(codes / "test"), None, cfg.vqa_images)
    train = eval_samples(bundle, str(codes / "train"), None, cfg.open_world.train_images)
    report["caption_test"] = teacher_forced(
        bundle, [[Segment.img(s["image"], loss=False), Segment.txt(s["caption"])] for s in test], cfg.seq_len)
    report["caption_train"] = teacher_forced(
        bundle, [[Segment.img(s["image"], loss=False), Segment.txt(s["caption"])] for s in train], cfg.seq_len)
    report["text_only_test"] = teacher_forced(bundle, [[Segment.txt(s["caption"])] for s in test], cfg.seq_len)
    report["image_given_caption_test"] = teacher_forced(
        bundle, [[Segment.txt(s["caption"], loss=False), Segment.img(s["image"])] for s in test], cfg.seq_len)
    report["caption_gain_test"] = caption_gain(bundle, test, cfg.seq_len, None)

    k = cfg.open_world.show
    recon = lambda ss: [to_pil(bundle.tokenizer.decode(torch.from_numpy(s["image"])[None])[0]) for s in ss]
    recon_test, recon_train = recon(test), recon(train)  # decoded once, shown and scored below
    said = greedy_captions(bundle, [s["image"] for s in test[:k]])
    report["greedy_captions"] = [{"key": s["key"], "caption": s["caption"], "model": m} for s, m in zip(test, said)]
    report["greedy_captions_png"] = str(save_labelled(
        [(im, f"true: {s['caption']}\nmodel: {m}") for im, s, m in zip(recon_test[:k], test, said)],
        out_dir / "greedy_captions.png"))

    g = cfg.generation
    sc = SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, cfg_scale=g.cfg_scale,
                        max_new_tokens=bundle.vocab.layout.span_len)
    res = bundle.tokenizer.cfg.resolution
    drawn = {}
    for name, ss in (("test", test), ("train", train)):
        images, tokens, elapsed = generate_images(bundle, [s["caption"] for s in ss], sc, res, cfg.seed)
        drawn[name] = images
        report[f"generation_{name}"] = {"images": len(images), "image_tokens_per_s": round(tokens / elapsed, 1),
                                        "cfg_scale": sc.cfg_scale, "temperature": sc.temperature, "top_k": sc.top_k}
    real = {k: to_pil(ImageTransform(res)(im)) for k, im in originals(cfg.data.get("test"), [s["key"] for s in test]).items()}
    rows = [[real[s["key"]] for s in test[:k] if s["key"] in real], recon_test[:k], drawn["test"][:k],
            recon_train[:k], drawn["train"][:k]]
    report["generation_grid"] = str(save_grid(rows, out_dir / "generation_grid.png", scale=2))
    (out_dir / "generation_prompts.txt").write_text(
        "".join(f"{name}\t{s['caption']}\n" for name, ss in (("test", test[:k]), ("train", train[:k])) for s in ss))

    if cfg.retrieval.tower_run:
        from fusion.retrieval import Retriever

        r = Retriever(cfg.retrieval.tower_run)
        caps = {"test": [s["caption"] for s in test], "train": [s["caption"] for s in train]}
        out = {}
        if len(real) == len(test):
            out["real_test"] = r.top1([real[s["key"]] for s in test], caps["test"], seed=cfg.seed)
        out["reconstructed_test"] = r.top1(recon_test, caps["test"], seed=cfg.seed)
        out["generated_test"] = r.top1(drawn["test"], caps["test"], seed=cfg.seed)
        out["reconstructed_train"] = r.top1(recon_train, caps["train"], seed=cfg.seed)
        out["generated_train"] = r.top1(drawn["train"], caps["train"], seed=cfg.seed)
        report["retrieval"] = out
    return report


def evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    dtype = inference_dtype(cfg.get("precision", "auto"))
    bundle = load_bundle(cfg.model_dir, dtype=dtype)
    torch.manual_seed(cfg.seed)
    codes = Path(cfg.codes)
    world = world_of(cfg.data)
    precision = str(dtype).removeprefix("torch.")
    if world is None:
        report = open_world_report(bundle, cfg, codes, out_dir, precision)
        write_json(out_dir / "evaluation.json", report)
        return report
    report: dict = {"model": str(cfg.model_dir), "arm": bundle.arm, "precision": precision}
    for split in cfg.vqa_splits:
        samples = eval_samples(bundle, str(codes / split), cfg.data.get(split), cfg.vqa_images)
        report[f"vqa_{split}"] = vqa_accuracy(bundle, samples, cfg.max_questions)
        write_jsonl(out_dir / f"vqa_{split}_answers.jsonl", report[f"vqa_{split}"].pop("records", []))
        report[f"caption_{split}"] = teacher_forced(
            bundle, [[Segment.img(s["image"], loss=False), Segment.txt(s["caption"])] for s in samples], cfg.seq_len)
        report[f"text_only_{split}"] = teacher_forced(bundle, [[Segment.txt(s["caption"])] for s in samples], cfg.seq_len)
        if bundle.arm == "fusion":
            report[f"image_given_caption_{split}"] = teacher_forced(
                bundle, [[Segment.txt(s["caption"], loss=False), Segment.img(s["image"])] for s in samples], cfg.seq_len)
            report[f"caption_gain_{split}"] = caption_gain(bundle, samples, cfg.seq_len, world)
        probe_images = int((cfg.get("binding_probe") or {}).get("images", 0))
        if bundle.arm == "fusion" and split == "test" and probe_images > 0:
            from fusion.probes import binding_probe

            report["binding_probe"] = binding_probe(bundle, samples[:probe_images])
    if bundle.arm == "adapter":
        report["generation"] = None  # the adapter baseline reads images but cannot write them
    elif cfg.generation.per_type > 0:
        sc = SamplingConfig(temperature=cfg.generation.temperature, top_k=cfg.generation.top_k,
                            top_p=cfg.generation.top_p, cfg_scale=cfg.generation.cfg_scale,
                            max_new_tokens=bundle.vocab.layout.span_len)
        report["generation"] = generation_scores(bundle, world, cfg.generation.per_type, sc, out_dir, cfg.seed)
    write_json(out_dir / "evaluation.json", report)
    return report


def summary_table(report: dict) -> str:
    """The short table make demo prints."""
    lines = []
    vqa = report.get("vqa_test") or {}
    if vqa:
        lines.append("VQA accuracy (test)   " + "  ".join(f"{k} {v:.0%}" for k, v in vqa["per_type"].items())
                     + f"  | all {vqa['accuracy']:.0%} ({vqa['questions']} q)")
        if vqa.get("wrong_in_scene"):
            chance = vqa["wrong_in_scene_chance"]
            lines.append("VQA wrong answers     " + "  ".join(f"{k} {v:.0%} (chance {chance[k]:.0%})"
                                                            for k, v in vqa["wrong_in_scene"].items())
                         + "  name another object's attribute: binding, not seeing")
        pos = vqa.get("position_detail") or {}
        parts = [f"where ({k.split('_')[1]} object{'s' if k.endswith('several') else ''}) row {v['row']:.0%} "
                 f"column {v['column']:.0%}" for k, v in pos.items() if k.startswith("where")]
        if "relation" in pos:
            parts.append(f"left of / above {pos['relation']['right']:.0%} (said yes {pos['relation']['said_yes']:.0%})")
        if parts:
            lines.append("VQA position          " + "  ".join(parts))
        cnt = vqa.get("count_detail") or {}
        if cnt:
            lines.append("VQA count             " + "  ".join(f"{f} {v['right']:.0%}" for f, v in cnt["by_form"].items())
                         + "  | by truth " + " ".join(f"{y}:{v['right']:.0%}" for y, v in cnt["by_truth"].items())
                         + f"  | wrong answers off by one {cnt['wrong_off_by_one']:.0%}")
        if vqa.get("description"):
            d = vqa["description"]
            lines.append(f"scene description     cells right {d['cells']:.0%}  whole scene right {d['whole']:.0%}"
                         f"  ({d['images']} images; the model's own, written before the questions)")
    if report.get("binding_probe"):
        from fusion.probes import summary_lines

        lines += summary_lines(report["binding_probe"])
    held = report.get("vqa_holdout") or {}
    if held:
        lines.append("VQA accuracy (holdout) " + "  ".join(f"{k} {v:.0%}" for k, v in held["per_type"].items()))
    cap = report.get("caption_test")
    if cap:
        lines.append(f"caption (test)        perplexity {cap['perplexity']:.2f}  token accuracy {cap['token_accuracy']:.0%}")
    train_cap = report.get("caption_train")
    if train_cap:
        lines.append(f"caption (train)       perplexity {train_cap['perplexity']:.2f}  token accuracy "
                     f"{train_cap['token_accuracy']:.0%}")
    gain = report.get("caption_gain_test")
    if gain:
        bound = f" of a {gain['bound']:.1f}-nat bound ({gain['fraction_of_bound']:.0%})" if "bound" in gain else ""
        lines.append(f"caption gain (test)   {gain['gain_vs_empty']:.1f} nats per image vs the empty caption{bound}; "
                     f"{gain['gain']:.1f} vs another scene's")
    gen = report.get("generation")
    if gen:
        lines.append("generation judge      " + "  ".join(f"{k} {v:.0%}" for k, v in gen["per_type"].items())
                     + f"  | all {gen['pass_rate']:.0%}")
        if gen.get("attributes"):
            lines.append("judge attributes      " + "  ".join(f"{k} {v:.0%}" for k, v in gen["attributes"].items())
                         + "  (each asked attribute right on its own)")
        lines.append(f"sampling              {gen['image_tokens_per_s']:.0f} image tokens/s (batch 16, KV cache, "
                     f"{report.get('precision', 'float32')} weights)")
    ret = report.get("retrieval")
    if ret:
        chance = next(iter(ret.values()))["chance"]
        lines.append("retrieval top-1       " + "  ".join(f"{k.replace('_', ' ')} {v['top1']:.0%}" for k, v in ret.items())
                     + f"  (own caption among {next(iter(ret.values()))['candidates']}; chance {chance:.0%})")
    for name in ("generation_grid", "greedy_captions_png"):
        if report.get(name):
            lines.append(f"{name.replace('_', ' '):<22}{report[name]}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate_fusion")
@cli
def main(cfg: DictConfig):
    out_dir = run_dir_of(cfg)
    save_resolved_config(cfg, out_dir)
    report = evaluate(cfg, out_dir)
    print(summary_table(report))
    print(f"-> {out_dir / 'evaluation.json'}")
    return report


if __name__ == "__main__":
    main()
