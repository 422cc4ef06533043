"""Train the early-fusion decoder on code shards: `python -m fusion.train codes=DIR [hydra overrides]`.

Writes into the run folder: config.yaml (resolved), vocab/, checkpoints/ (last + best, for resume),
logs/ (CSV; TensorBoard when installed), samples/ (a grid of generated images at every validation),
model/ (the self-contained trained model: what fusion.sample and fusion.evaluate load) and
train_summary.json.
"""

from __future__ import annotations

import dataclasses

import itertools
import json
import random
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from data.grid import save_grid
from data.loader import ImageTransform, in_order, make_loader, train_loader
from data.runtime import (UserError, audit_callback, checkpoint_callbacks, cli, env_is_rank_zero, make_trainer, resume_checkpoint, run_dir_of, save_resolved_config,
                          throughput_monitor, write_json)
from data.shards import ReadStats
from data.shapes import Scene, grid_description, world_of, worked_answer, worked_kinds
from fusion.checkpoint import save_bundle
from fusion.curves import CurveConfig, LearningCurves
from fusion.data import iter_code_samples, sequence_stages
from fusion.documents import TaskMix, qa_prompt
from fusion.generate import Generator, SamplingConfig
from fusion.lit import AdapterModule, FusionModule
from fusion.vocab import ImageLayout, MultimodalVocab, load_text_tokenizer, train_text_tokenizer
from tokenizer.checkpoint import load_tokenizer, read_tokenizer_meta
from tokenizer.model import TokenizerConfig
from tokenizer.pretokenize import TOKENIZER_META


def code_source(cfg: DictConfig) -> tuple[Path, str, dict]:
    """The code shards' folder, the image tokenizer they were made with, and its metadata."""
    codes = Path(cfg.codes)
    if not (codes / TOKENIZER_META).is_file():
        raise UserError(f"{codes} holds no code shards ({TOKENIZER_META} missing): run tokenizer.pretokenize first")
    made_with = json.loads((codes / TOKENIZER_META).read_text())
    tokenizer_dir = cfg.get("tokenizer_dir") or made_with["tokenizer_dir"]
    meta = read_tokenizer_meta(tokenizer_dir)
    if meta["fingerprint"] != made_with["fingerprint"]:
        raise UserError(f"codes in {codes} were made by tokenizer {made_with['fingerprint']}, "
                        f"but {tokenizer_dir} is {meta['fingerprint']}")
    return codes, tokenizer_dir, meta


def build_vocab(cfg: DictConfig, codes: Path, tok_meta: dict) -> MultimodalVocab:
    """The text tokenizer (trained on the training captions and QA, and the scene descriptions of a describe-first
    model; or loaded) + specials + image codes."""
    if cfg.get("vocab_dir"):  # e.g. the ablation: both arms share one vocabulary
        vocab = MultimodalVocab.load(cfg.vocab_dir)
        if vocab.num_codes != tok_meta["num_codes"] or vocab.layout.grid != tok_meta["grid"]:
            raise UserError(f"vocabulary {cfg.vocab_dir} is for {vocab.num_codes} codes on a {vocab.layout.grid} grid, "
                            f"the tokenizer makes {tok_meta['num_codes']} on {tok_meta['grid']}")
        return vocab
    layout = ImageLayout(grid=tok_meta["grid"], row_separator=cfg.layout.row_separator)
    if cfg.text.tokenizer:
        text_tok = load_text_tokenizer(cfg.text.tokenizer)
    else:
        worked = worked_kinds(cfg.get("worked_answers"))

        def texts():
            for i, s in enumerate(iter_code_samples(str(codes / "train"), tok_meta["grid"], tok_meta["num_codes"])):
                if i >= cfg.text.train_samples:
                    return
                yield s["caption"]
                scene = Scene.from_json(s["meta"]["scene"]) if s["meta"].get("scene") else None
                for qa in s["meta"].get("qa") or []:
                    answer = worked_answer(scene, qa["q"], qa["a"], worked) if worked and scene else qa["a"]
                    yield f"{qa_prompt(qa['q'], bool(cfg.get('restate_referent')))} {answer}"
                if cfg.get("describe_first") and scene:  # the text it will write, tokenized as such
                    yield grid_description(scene)
        text_tok = train_text_tokenizer(texts(), vocab_size=cfg.text.vocab_size)
    return MultimodalVocab(text_tok, tok_meta["num_codes"], layout)


class SampleGrid(Callback):
    """At every validation, draw images for a few fixed validation captions: watch images appear."""

    def __init__(self, vocab: MultimodalVocab, tokenizer_dir: str, captions: list[str], out: Path, sc: SamplingConfig):
        self.vocab, self.captions, self.out, self.sc = vocab, captions, out, sc
        self.tokenizer = load_tokenizer(tokenizer_dir)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or not self.captions:
            return
        was_training = pl_module.training
        pl_module.eval()
        prompts = [[self.vocab.bos, *self.vocab.encode_text(c), self.vocab.boi] for c in self.captions]
        gen = Generator(pl_module.decoder, self.vocab).generate(prompts, self.sc, seed=0)
        images = []
        for p, g in zip(prompts, gen):
            try:
                codes = self.vocab.decode_image([self.vocab.boi, *g])
                images.append(self.tokenizer.decode(torch.from_numpy(codes)[None])[0])
            except ValueError:
                images.append(torch.zeros(3, self.tokenizer.cfg.resolution, self.tokenizer.cfg.resolution))
        path = save_grid([images], self.out / f"step_{trainer.global_step:06d}.png", scale=3)
        save_grid([images], self.out / "latest.png", scale=3)
        (self.out / "prompts.txt").write_text("\n".join(self.captions) + "\n")
        if was_training:
            pl_module.train()
        print(f"samples at step {trainer.global_step}: {path}", flush=True)


def optim_config(t: DictConfig) -> dict:
    return {"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio, "optimizer": t.get("optimizer", "adamw"),
            "muon_momentum": t.get("muon_momentum", 0.95), "schedule": t.get("schedule", "cosine"),
            "decay_frac": t.get("decay_frac", 0.2), "time_budget_s": 60 * t.time_budget_min if t.get("time_budget_min") else None,
            "flops_budget": float(t.flops_budget) if t.get("flops_budget") else None}


def lr_scales(t: DictConfig, decoder: dict) -> dict[str, float]:
    """train.embed_lr_scale / head_lr_scale as LR multipliers per parameter-name prefix (data.runtime)."""
    embed, head = float(t.get("embed_lr_scale", 1.0)), float(t.get("head_lr_scale", 1.0))
    if decoder.get("tie_embeddings") and head != embed:
        raise UserError(f"tied embeddings share one table: embed_lr_scale ({embed}) and head_lr_scale ({head}) "
                        "must be equal")
    out = {"decoder.lm.model.embed_tokens": embed}
    if decoder.get("image_pos_embed"):
        out |= {"decoder.image_rows": embed, "decoder.image_cols": embed}
    if not decoder.get("tie_embeddings"):
        out["decoder.lm.lm_head"] = head
    return {k: v for k, v in out.items() if v != 1.0}


def build_module(cfg: DictConfig, vocab: MultimodalVocab, run_dir: Path, tok_config: dict) -> FusionModule:
    """Both arms build the decoder first from the same seed, so they start from identical weights."""
    decoder = OmegaConf.to_container(cfg.decoder, resolve=True)
    if cfg.arm == "fusion":  # where the vocabulary puts codes on the grid, and what an FSQ code is made of
        decoder["image_layout"] = vocab.image_layout()
        if "levels" in decoder.get("code_features", []):
            if tok_config.get("quantizer") != "fsq":
                raise UserError(f"decoder.code_features=[levels] needs an FSQ image tokenizer; this one is "
                                f"{tok_config.get('quantizer')!r} (drop levels from decoder.code_features)")
            decoder["code_levels"] = list(tok_config["fsq_levels"])
        if "pixels" in decoder.get("code_features", []):
            decoder["code_pixel_dim"] = 3 * TokenizerConfig.from_dict(tok_config).downsample ** 2  # one patch, RGB
    else:  # the adapter's sequences hold no codes: nothing to place
        decoder.update(image_pos_embed=False, image_pos_every_layer=False, image_pos_values=False, image_layout=None, code_features=[], code_levels=None,
                       code_pixel_dim=None, code_head=False)
    common = dict(decoder=decoder, vocab_size=vocab.size,
                  vocab_fingerprint=vocab.fingerprint(), optim=optim_config(cfg.train),
                  loss=OmegaConf.to_container(cfg.loss, resolve=True), seq_len=cfg.seq_len)
    lr_scale = lr_scales(cfg.train, decoder)
    if cfg.arm == "fusion":
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        return FusionModule(**common, lr_scale=lr_scale)
    if cfg.arm != "adapter":
        raise UserError(f"arm must be fusion or adapter, got {cfg.arm!r}")
    tower = OmegaConf.to_container(cfg.tower, resolve=True)
    if not tower.get("pretrained"):  # never a random encoder: pretrain one on the same shards first
        from fusion.pretrain_tower import pretrain_tower

        sub = OmegaConf.merge(hydra.compose(config_name="pretrain_tower", overrides=list(cfg.adapter.tower_overrides)),
                              {"data": cfg.data, "tower": cfg.tower, "seed": cfg.seed})
        tower["pretrained"] = pretrain_tower(sub, run_dir / "tower_pretraining")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stages = OmegaConf.to_container(cfg.adapter.stages, resolve=True) if cfg.adapter.two_stage else None
    return AdapterModule(**common, tower=tower, connector=cfg.adapter.connector, placeholder_id=vocab.placeholder,
                         lr_scale={**lr_scale, **cfg.adapter.lr_scale}, stages=stages)


def compile_wanted(setting, max_steps: int | None, strategy: str = "auto") -> bool:
    """train.compile: true | false | auto (compile when the run is long enough to repay the ~20-60 s the
    first step spends compiling: max_steps >= 500 or no step bound; not under FSDP, whose wrapped and
    checkpointed blocks are untested with it here)."""
    if setting == "auto":
        return (not max_steps or max_steps < 0 or max_steps >= 500) and "fsdp" not in str(strategy)
    if isinstance(setting, bool):
        return setting
    raise UserError(f"train.compile must be true, false or auto, got {setting!r}")


def task_phases(phases, max_steps: int | None) -> tuple[tuple[int, dict[str, float], int, bool], ...]:
    """conf `task_phases` ([{at, tasks, curriculum, fork_expert}, ...]) -> ((step, weights, curriculum steps,
    fork), ...). `at` is a step (an integer >= 1) or a fraction of trainer.max_steps (0 < at < 1), so a phase scales
    with the run's length; `tasks` replaces the whole mix; `curriculum` (optional, steps): the phase's first that
    many steps draw only scenes of at most curriculum.max_objects objects again (a new mix meets small scenes
    first); `fork_expert` (optional, decoder.write_expert only): the writing copy restarts as a copy of the shared
    weights at the phase's first step (fusion.experts.fork_write_expert)."""
    out = []
    for i, phase in enumerate(phases or []):
        if not hasattr(phase, "keys") or not {"at", "tasks"} <= set(phase) <= {"at", "tasks", "curriculum", "fork_expert"}:
            got = sorted(phase) if hasattr(phase, "keys") else repr(phase)
            raise UserError(f"task_phases[{i}] needs the keys at and tasks (and optionally curriculum, fork_expert), "
                            f"got {got}")
        at = phase["at"]
        if isinstance(at, float) and 0 < at < 1:
            if not max_steps or max_steps < 0:
                raise UserError(f"task_phases[{i}].at={at} is a fraction of trainer.max_steps, which is not set")
            at = max(1, round(at * max_steps))
        elif isinstance(at, bool) or not isinstance(at, int) or at < 1:
            raise UserError(f"task_phases[{i}].at must be a step >= 1 or a fraction in (0, 1), got {at!r}")
        tasks = phase["tasks"]
        if not hasattr(tasks, "items") or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in tasks.values()):
            raise UserError(f"task_phases[{i}].tasks must map task names to weights, got {tasks!r}")
        steps = phase.get("curriculum", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UserError(f"task_phases[{i}].curriculum must be a number of steps >= 0, got {steps!r}")
        fork = phase.get("fork_expert", False)
        if not isinstance(fork, bool):
            raise UserError(f"task_phases[{i}].fork_expert must be true or false, got {fork!r}")
        out.append((at, {k: float(v) for k, v in tasks.items()}, steps, fork))
    return tuple(out)


def task_mix(cfg: DictConfig, phases: tuple) -> TaskMix:
    """The training documents' mix, from the conf and its `task_phases` (parsed); a mix it cannot make fails in
    one line."""
    curriculum = cfg.get("curriculum") or {}
    try:
        return TaskMix(weights=dict(cfg.tasks), cond_dropout=cfg.cond_dropout, max_qa=cfg.get("max_qa", 12),
                       caption_template=cfg.get("caption_template"), read_image_loss=bool(cfg.get("read_image_loss")),
                       curriculum_documents=int(curriculum.get("documents", 0)),
                       curriculum_max_objects=int(curriculum.get("max_objects", 1)),
                       curriculum_step_documents=int(curriculum.get("step_documents", 0)),
                       question_first=bool(cfg.get("question_first")), extra_qa=tuple(cfg.get("extra_qa") or ()),
                       describe_first=bool(cfg.get("describe_first")), restate_referent=bool(cfg.get("restate_referent")),
                       worked_answers=worked_kinds(cfg.get("worked_answers")),
                       phases=tuple((at, weights) for at, weights, _, _ in phases),
                       curriculum_windows=tuple((at, at + steps) for at, _, steps, _ in phases if steps))
    except ValueError as e:
        raise UserError(str(e)) from e


def donate_init(module: FusionModule, cfg: DictConfig, vocab: MultimodalVocab, run_dir: Path, tok_config: dict):
    """init_donor {seed, parts, blocks}: the named parts of the decoder (in the named blocks; null: all) start from
    another seed's initial weights (the global random state is left as it was, so nothing else in the run changes)."""
    from fusion.decoder import take_init

    donor = cfg.init_donor
    if cfg.arm != "fusion" or donor.get("seed") is None:
        raise UserError("init_donor needs arm=fusion and a seed: init_donor={seed: 1, parts: [qk, vo]}")
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():  # torch's generators, CUDA's included, come back as they were
        other = build_module(OmegaConf.merge(cfg, {"seed": int(donor.seed)}), vocab, run_dir, tok_config)
    random.setstate(states[0]), np.random.set_state(states[1])
    blocks = donor.get("blocks")
    taken = take_init(module.decoder, other.decoder, list(donor.get("parts") or []),
                      None if blocks is None else [int(b) for b in blocks])
    where = "" if blocks is None else f" in blocks {list(blocks)}"
    print(f"init_donor: {len(taken)} tensors ({', '.join(donor.parts)}{where}) start from seed {donor.seed}'s weights",
          flush=True)


def train(cfg: DictConfig) -> dict:
    run_dir = run_dir_of(cfg)
    save_resolved_config(cfg, run_dir)
    phases = task_phases(cfg.get("task_phases"), cfg.trainer.max_steps)
    mix = task_mix(cfg, phases)
    fork_steps = tuple(at for at, _, _, fork in phases if fork)
    if fork_steps and not cfg.decoder.get("write_expert"):
        raise UserError("task_phases' fork_expert needs decoder.write_expert=true (there is no writing copy to fork)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    codes, tokenizer_dir, tok_meta = code_source(cfg)
    if cfg.get("resume") and (run_dir / "vocab" / "vocab.json").is_file():
        vocab = MultimodalVocab.load(run_dir / "vocab")  # resume with the vocabulary the run started with
    else:
        vocab = build_vocab(cfg, codes, tok_meta)  # deterministic: every rank builds the same one
        if env_is_rank_zero():
            vocab.save(run_dir / "vocab")
    t = cfg.train
    module = build_module(cfg, vocab, run_dir, tok_meta["config"])
    if cfg.get("init_donor"):
        donate_init(module, cfg, vocab, run_dir, tok_meta["config"])
    module.compile_training = compile_wanted(t.get("compile", False), cfg.trainer.max_steps, cfg.trainer.get("strategy", "auto"))
    if module.decoder.cfg.write_expert and module.compile_training:  # data-dependent routing breaks the graph
        if t.get("compile") is True:  # asked for explicitly: say why it is not honoured (auto stays quiet)
            print("note: decoder.write_expert trains without torch.compile (its routing breaks the graph in every "
                  "block); train_summary.json says compiled: false", flush=True)
        module.compile_training = False
    module.fork_steps = fork_steps
    if cfg.arm == "fusion" and "pixels" in module.decoder.cfg.code_features:
        from fusion.decoder import code_pixel_features

        module.decoder.set_code_pixels(code_pixel_features(load_tokenizer(tokenizer_dir), vocab.num_codes))
    if cfg.arm == "fusion" and cfg.get("seed_code_embeddings"):
        from fusion.decoder import seed_code_embeddings

        seed_code_embeddings(module.decoder, vocab.code_offset, vocab.num_codes, tok_meta["grid"],
                             load_tokenizer(tokenizer_dir), seed=cfg.seed)
    if cfg.arm == "fusion":
        sources, extra = (str(codes / "train"), str(codes / "val")), {}
    else:  # the adapter reads the image shards the codes were made from: same keys, same order
        sources = (cfg.data.train, cfg.data.val)
        extra = {"pixels": ImageTransform(cfg.tower.image_size), "placeholders": module.image_encoder.tokens_per_image}
    val_mix = dataclasses.replace(mix, curriculum_documents=0, phases=())  # val/loss on one mix throughout
    # how the model reads; saved with it (Bundle.question_first, .describe_first, .restate_referent, .worked_answers)
    reading = {"question_first": mix.question_first, "describe_first": mix.describe_first,
               "restate_referent": mix.restate_referent, "worked_answers": mix.worked_answers}
    val_data = in_order(sources[1], sequence_stages(vocab, cfg.seq_len, t.batch_size, val_mix, seed=1234,
                                                    shuffle_buffer=0, **extra))
    captions = [s["caption"] for _, s in zip(range(cfg.samples.count),
                                              iter_code_samples(str(codes / "val"), tok_meta["grid"], tok_meta["num_codes"]))]
    sc = SamplingConfig(temperature=cfg.samples.temperature, top_k=cfg.samples.top_k, cfg_scale=cfg.samples.cfg_scale,
                        max_new_tokens=vocab.layout.span_len)
    callbacks = [*checkpoint_callbacks(run_dir, cfg.checkpoint_every, "val/loss", "min"), LearningRateMonitor("step"),
                 throughput_monitor(length_fn=lambda b: b["input_ids"].numel())]
    if cfg.arm == "fusion":  # the adapter cannot write images
        callbacks.append(SampleGrid(vocab, tokenizer_dir, captions, run_dir / "samples", sc))
        curves = CurveConfig(**OmegaConf.to_container(cfg.curves, resolve=True)) if cfg.get("curves") else None
        if curves and (curves.gain_images or curves.vqa_images or curves.judge_per_type):
            n = max(curves.gain_images, curves.vqa_images)
            held = list(itertools.islice(iter_code_samples(str(codes / "val"), tok_meta["grid"], tok_meta["num_codes"]), n))
            callbacks.append(LearningCurves(vocab, load_tokenizer(tokenizer_dir), held, cfg.seq_len,
                                            t.batch_size * cfg.seq_len, world_of(cfg.data), run_dir, curves,
                                            meta={"reading": reading}))
    if cfg.get("audit"):
        callbacks.append(audit_callback(run_dir))
    overrides = {"max_time": {"seconds": int(60 * t.time_budget_min)}} if t.get("time_budget_min") else {}
    trainer = make_trainer(cfg.trainer, run_dir, callbacks, **overrides)
    ckpt_path = resume_checkpoint(cfg.get("resume"), run_dir, expect={"vocab_fingerprint": vocab.fingerprint(),
                                                                      "decoder": module.hparams.decoder})
    start = time.time()
    data_seed = cfg.seed if cfg.get("data_seed") is None else cfg.data_seed  # the stream's shuffle and draws
    train_data = train_loader(sources[0], lambda seed, clock: sequence_stages(
        vocab, cfg.seq_len, t.batch_size, mix, seed=f"{data_seed}/{seed}", shuffle_buffer=t.shuffle_buffer,
        partial=False, clock=clock, **extra), t.num_workers, steps=lambda: trainer.global_step, clocked=True)
    trainer.fit(module, train_dataloaders=train_data, val_dataloaders=make_loader(val_data), ckpt_path=ckpt_path)
    elapsed = time.time() - start
    if not trainer.is_global_zero:
        return {}
    tokens_per_step = t.batch_size * cfg.seq_len * max(1, trainer.world_size)
    tokens, first = trainer.global_step * tokens_per_step, getattr(module, "first_step", 0)
    summary = {"steps": trainer.global_step, "resumed_from": first, "seconds": round(elapsed, 1), "tokens": tokens,
               "tokens_per_s": round((trainer.global_step - first) * tokens_per_step / max(elapsed, 1e-9), 1),
               "precision": str(trainer.precision),
               "compiled": module.compile_training,
               "params": sum(p.numel() for p in module.decoder.parameters()),
               "non_embedding_params": module.decoder.cfg.non_embedding_params(),
               "flops_per_token": module.flops_per_token, "train_flops": module.train_flops,
               "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
               "data": module.data_stats.to_json()}
    if cfg.arm == "adapter":
        summary["image_encoder_params"] = sum(p.numel() for p in module.image_encoder.parameters())
        summary["flops_per_image"] = module.flops_per_image
    summary["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    save_bundle(run_dir / "model", module.decoder, vocab, tokenizer_dir, extra={"train": summary, "arm": cfg.arm,
                                                                  "reading": reading},
                image_encoder=module.image_encoder if cfg.arm == "adapter" else None)
    write_json(run_dir / "train_summary.json", summary)
    print(f"model: {run_dir / 'model'}  ({summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
          f"{elapsed / 60:.1f} min)")
    return summary


@hydra.main(version_base=None, config_path="../conf", config_name="train_fusion")
@cli
def main(cfg: DictConfig):
    torch.set_float32_matmul_precision("high")
    return train(cfg)


if __name__ == "__main__":
    main()
