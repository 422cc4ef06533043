"""The decoder's speed figures for README.md: `python -m fusion.bench [--model tiny] [--codes DIR]`.

  peak      this CPU's matmul GFLOP/s in fp32 and bf16 (measured here, in this run)
  train     training tokens/s and MFU (FLOPs formula in fusion/decoder.py against the measured peak of
            the precision used) of the step fusion.train takes (Muon, compiled forward) and of the step without
            each speed-up; where the time goes (forward, backward, optimizer); medians over timed steps
  sample    image tokens/s at batch 1 and 16 with the KV cache, and at batch 1 without it (the speed-up)
  loader    packed-sequence batches/s from code shards (when --codes is given)
  attention forward + backward of a packed batch with and without attention (transformers' SDPA swapped for one
            that returns the values): attention's share of the step (README screen 30: half, on the demo's batches)
Targets (issue 3): MFU >= 35 %, KV-cache speed-up >= 5x for one image. Writes bench/fusion.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from data.runtime import cpu_matmul_peaks, resolve_precision, write_json
from fusion.decoder import Decoder, lm_losses
from fusion.generate import Generator, SamplingConfig
from fusion.presets import preset
from fusion.vocab import ImageLayout, MultimodalVocab, train_text_tokenizer


def bench_vocab(num_codes: int = 1024, grid: int = 12) -> MultimodalVocab:
    from data.shapes import WorldConfig, make_sample

    texts = [make_sample(WorldConfig(), "train", i)["caption"] for i in range(300)]
    return MultimodalVocab(train_text_tokenizer(texts, vocab_size=512), num_codes, ImageLayout(grid))


def train_speed(model: str, vocab_size: int, seq_len: int, batch: int, precision: str, steps: int,
                peaks: dict, optimizer: str = "muon", compile: bool = False) -> dict:
    """One training step as fusion.train takes it (the project's optimizer, optionally the compiled forward),
    timed in three parts: forward + loss, backward, optimizer step. Medians over `steps` after warm-up."""
    from data.runtime import adamw_with_schedule

    torch.manual_seed(0)
    cfg = preset(model, seq_len)
    dec = Decoder(cfg, vocab_size).train()
    o = {"optimizer": optimizer, "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 0,
         "min_lr_ratio": 1.0, "muon_momentum": 0.95}
    opt = adamw_with_schedule(dec.named_parameters(), o, max_steps=steps + 3)[1]["optimizer"]
    forward = torch.compile(dec) if compile else dec
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    pos = torch.arange(seq_len).expand(batch, -1)
    labels, modality = ids.roll(-1, 1), (ids > vocab_size // 2).long()
    parts = {"forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = forward(input_ids=ids, position_ids=pos).logits
        loss = lm_losses(logits, labels, modality, cfg.z_loss)["loss"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # the first steps compile, allocate and warm caches
            for k, v in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                parts[k].append(v)
    ms = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    step_s = sum(ms.values()) / 1e3
    tokens_s = batch * seq_len / step_s
    flops_s = tokens_s * cfg.flops_per_token(seq_len)
    peak = peaks["bf16" if precision == "bf16-mixed" else "fp32"] * 1e9
    return {"precision": precision, "optimizer": optimizer, "compiled": compile, "tokens_per_s": round(tokens_s),
            "gflops_per_s": round(flops_s / 1e9, 1), "mfu": round(flops_s / peak, 3),
            # the peak this MFU divides by, kept with the row: a later run of other parts re-measures the report's
            # top-level peak_gflops, which then is no longer the one this row was measured against
            "peak_gflops": round(peak / 1e9, 1), "step_s_median": round(step_s, 3),
            "ms": {k: round(v, 1) for k, v in ms.items()}, "batch": batch, "seq_len": seq_len,
            "non_embedding_params": cfg.non_embedding_params()}


@contextlib.contextmanager
def attention_replaced_by_values():
    """Inside: transformers' SDPA attention returns each query's own values (no scores, no softmax, no mask), so a
    step timed inside costs what it would without attention. The real function is back on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def values(module, query, key, value, attention_mask, **kwargs):
        rep = query.shape[1] // value.shape[1]  # grouped-query attention: each kv head serves `rep` query heads
        return (value.repeat_interleave(rep, 1) if rep > 1 else value).transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = values
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = real


def attention_share(model: str, vocab_size: int, seq_len: int, batch: int, precision: str, rounds: int = 4,
                    doc_len: int = 160) -> dict:
    """Forward + backward (eager) of a batch of packed documents of `doc_len` tokens (the demo's t2i documents are
    ~160) with and without attention, interleaved rounds, medians: what attention costs of the step."""
    torch.manual_seed(0)
    cfg = preset(model, seq_len)
    dec = Decoder(cfg, vocab_size).train()
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    pos = (torch.arange(seq_len) % doc_len).expand(batch, -1)  # position ids restart: packed documents
    labels, modality = ids.roll(-1, 1), (ids > vocab_size // 2).long()

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = dec(input_ids=ids, position_ids=pos).logits
        lm_losses(logits, labels, modality, cfg.z_loss)["loss"].backward()
        dec.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times = {"with": [], "without": []}
    for r in range(rounds + 1):  # round 0 warms caches
        for k in times:
            with attention_replaced_by_values() if k == "without" else contextlib.nullcontext():
                dt = step()
            if r:
                times[k].append(dt)
    with_ms, without_ms = (statistics.median(times[k]) * 1e3 for k in ("with", "without"))
    return {"precision": precision, "batch": batch, "seq_len": seq_len, "doc_len": doc_len,
            "forward_backward_ms": round(with_ms, 1), "without_attention_ms": round(without_ms, 1),
            "attention_share": round(1 - without_ms / with_ms, 3)}


def sample_speed(model: str, vocab: MultimodalVocab, repeats: int = 5) -> dict:
    torch.manual_seed(0)
    dec = Decoder(preset(model, 512), vocab.size).eval()
    gen = Generator(dec, vocab)
    prompt = [vocab.bos, *vocab.encode_text("A picture of a red circle and two blue squares."), vocab.boi]
    out = {}
    for name, batch, cache in (("batch1_cache", 1, True), ("batch16_cache", 16, True), ("batch1_no_cache", 1, False)):
        sc = SamplingConfig(temperature=1.0, cfg_scale=1.0, max_new_tokens=vocab.layout.span_len, use_cache=cache)
        times = []
        for r in range(repeats):
            t = time.perf_counter()
            gen.generate([prompt] * batch, sc, seed=r)
            times.append(time.perf_counter() - t)
        out[name] = {"image_tokens_per_s": round(batch * vocab.layout.span_len / statistics.median(times), 1),
                     "seconds_per_batch": round(statistics.median(times), 3)}
    out["kv_cache_speedup_batch1"] = round(out["batch1_cache"]["image_tokens_per_s"] /
                                           out["batch1_no_cache"]["image_tokens_per_s"], 2)
    sc = SamplingConfig(temperature=1.0, cfg_scale=3.0, max_new_tokens=vocab.layout.span_len)
    t = time.perf_counter()
    gen.generate([prompt] * 16, sc)
    out["batch16_cache_cfg3"] = {"image_tokens_per_s": round(16 * vocab.layout.span_len / (time.perf_counter() - t), 1)}
    return out


def loader_speed(codes: Path, vocab: MultimodalVocab, batches: int = 50) -> dict:
    from data.loader import in_order
    from fusion.data import sequence_stages
    from fusion.documents import TaskMix

    pipe = in_order(str(codes / "train"), sequence_stages(vocab, 512, 8, TaskMix(), shuffle_buffer=1000))
    it = iter(pipe)
    next(it)
    t, n, real = time.perf_counter(), 0, 0
    for _, b in zip(range(batches), it):
        n += 1
        real += int((b["input_ids"] != vocab.pad).sum())
    s = time.perf_counter() - t
    return {"batches_per_s": round(n / s, 1), "tokens_per_s": round(n * 8 * 512 / s),
            "packing_fill": round(real / (n * 8 * 512), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--codes", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--parts", default="train,sample,loader,attention", help="any of train, sample, loader, attention")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    vocab = bench_vocab()
    peaks = cpu_matmul_peaks(seconds=1.0)
    name = "fusion.json" if args.model == "tiny" else f"fusion_{args.model}.json"
    # a run of some parts updates those parts of an earlier report and keeps the rest
    report = json.loads((args.out / name).read_text()) if (args.out / name).exists() else {}
    report.update({"model": args.model, "threads": torch.get_num_threads(),
                   "peak_gflops": {k: round(v, 1) for k, v in peaks.items()}})
    # the training default (batch 2, Muon, compiled) in both precisions; what each speed-up is worth beside it
    if "train" in parts:
        rows = [("32-true", 2, "muon", True), ("bf16-mixed", 2, "muon", True), ("bf16-mixed", 2, "muon", False),
                ("bf16-mixed", 2, "adamw", False), ("bf16-mixed", 8, "muon", True)]
        report["train"] = [train_speed(args.model, vocab.size, 512, b, p, args.steps, peaks, optimizer=o, compile=c)
                           for p, b, o, c in rows]
        for t in report["train"]:  # the yardstick: the bf16 matmul peak, whatever precision ran
            t["mfu_vs_bf16_peak"] = round(t["gflops_per_s"] * 1e9 / (peaks["bf16"] * 1e9), 3)
    if "sample" in parts:
        report["sample"] = sample_speed(args.model, vocab)
    if args.codes and "loader" in parts:
        report["loader"] = loader_speed(args.codes, vocab)
    if "attention" in parts:  # the demo's batch: 4 rows of 512 tokens, in the precision training would pick here
        report["attention"] = attention_share(args.model, vocab.size, 512, 4, resolve_precision("auto", "cpu"))
    write_json(args.out / name, report)
    for t in report.get("train", []) if "train" in parts else []:
        print(f"train {t['precision']:10} batch {t['batch']} {t['optimizer']:5} {'compiled' if t['compiled'] else 'eager':8} "
              f"{t['tokens_per_s']:6} tokens/s  {t['gflops_per_s']:6} GFLOP/s  MFU {t['mfu']:.0%} of its precision's peak, "
              f"{t['mfu_vs_bf16_peak']:.0%} of the bf16 peak; ms forward {t['ms']['forward']}, backward "
              f"{t['ms']['backward']}, optimizer {t['ms']['optimizer']}")
    s = report.get("sample")
    if s and "sample" in parts:
        print(f"sample: batch 1 {s['batch1_cache']['image_tokens_per_s']} image tokens/s with cache, "
              f"{s['batch1_no_cache']['image_tokens_per_s']} without (x{s['kv_cache_speedup_batch1']}); "
              f"batch 16 {s['batch16_cache']['image_tokens_per_s']}")
    if "loader" in report and "loader" in parts:
        print(f"loader: {report['loader']}")
    a = report.get("attention")
    if a and "attention" in parts:
        print(f"attention: {a['attention_share']:.0%} of forward + backward ({a['forward_backward_ms']} ms with it, "
              f"{a['without_attention_ms']} without; batch {a['batch']} x {a['seq_len']}, documents of {a['doc_len']}, "
              f"{a['precision']}, eager)")
    print(f"peaks: {report['peak_gflops']} GFLOP/s -> {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
