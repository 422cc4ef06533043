"""Model size presets: parameters, training FLOPs per token and memory, for every conf/model/*.yaml.

    python -m fusion.presets [--vocab 74000] [--seq-len 4096]

Each model is built on the meta device (no memory, no time), so the counts are the real module's.
Memory for training with AdamW in bf16-mixed: 16 bytes per parameter (bf16 weights and gradients,
fp32 master weights and two moments), before activations and FSDP sharding (divide by the GPU count
under FULL_SHARD).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from fusion.decoder import Decoder, DecoderConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# Chameleon's vocabulary: 65,536 text tokens + 8,192 image codes (+ our specials)
CHAMELEON_VOCAB = 65536 + 8192 + 8


def preset(name: str, seq_len: int) -> DecoderConfig:
    d = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    d = {k: (seq_len if isinstance(v, str) and "seq_len" in v else v) for k, v in d.items()}
    return DecoderConfig.from_dict(d)


def describe(name: str, vocab_size: int, seq_len: int) -> dict:
    cfg = preset(name, seq_len)
    with torch.device("meta"):
        model = Decoder(cfg, vocab_size)
    params = sum(p.numel() for p in model.parameters())
    seq = min(seq_len, cfg.max_seq_len)
    return {"preset": name, "hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
            "params": params, "non_embedding_params": cfg.non_embedding_params(), "seq_len": seq,
            "train_flops_per_token": cfg.flops_per_token(seq), "train_memory_gib": params * 16 / 2**30,
            "bf16_weights_gib": params * 2 / 2**30}


def presets() -> list[str]:
    order = {"test": 0, "tiny": 1, "small": 2, "base": 3, "1b": 4, "7b": 5}
    return sorted((p.stem for p in CONF.glob("*.yaml")), key=lambda n: order.get(n, 99))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion.presets", description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=CHAMELEON_VOCAB)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args(argv)
    print(f"vocabulary {args.vocab:,} tokens; AdamW bf16-mixed training memory = 16 bytes/parameter before activations")
    print(f"{'preset':8} {'hidden':>6} {'layers':>6} {'params':>10} {'non-emb':>10} {'seq':>5} {'GFLOP/token':>12} "
          f"{'train mem':>10} {'bf16 weights':>12}")
    for name in presets():
        d = describe(name, args.vocab, args.seq_len)
        print(f"{name:8} {d['hidden']:6} {d['layers']:6} {d['params'] / 1e6:9.1f}M {d['non_embedding_params'] / 1e6:9.1f}M "
              f"{d['seq_len']:5} {d['train_flops_per_token'] / 1e9:12.3f} {d['train_memory_gib']:8.1f} GiB "
              f"{d['bf16_weights_gib']:10.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
