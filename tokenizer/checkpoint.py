"""Tokenizer weights on disk: `model.safetensors` + `config.json` in one folder, nothing pickled.

Loading checks the saved config against what the caller expects and refuses a mismatch by name,
so codes from one tokenizer are never decoded by another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.runtime import UserError
from tokenizer.model import TokenizerConfig, VQTokenizer

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# keys that change what a code means; the rest (ema decay, loss weights) only affect training
ARCH_KEYS = ("resolution", "channels", "encoder", "patch_hidden", "patch_layers", "blocks_per_level", "norm", "z_channels", "quantizer", "codebook_size",
             "codebook_dim", "fsq_levels")


def fingerprint(model: VQTokenizer) -> str:
    """A short hash of the weights: code shards record it so they are never paired with another tokenizer."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tokenizer(model: VQTokenizer, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    meta = {"config": model.cfg.to_dict(), "grid": model.cfg.grid, "num_codes": model.cfg.num_codes,
            "fingerprint": fingerprint(model), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_tokenizer_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"no tokenizer at {p}: expected {CONFIG} and {WEIGHTS} in that folder")
    try:
        return json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer config {p / CONFIG} is not valid JSON: {e}") from None


def load_tokenizer(path: str | os.PathLike, expect: dict | TokenizerConfig | None = None,
                   device: str | torch.device = "cpu") -> VQTokenizer:
    """Load a saved tokenizer; `expect` (a config or some of its keys) must agree with the saved one."""
    p = Path(path)
    meta = read_tokenizer_meta(p)
    cfg = TokenizerConfig.from_dict(meta["config"])
    if expect is not None:
        want = expect.to_dict() if isinstance(expect, TokenizerConfig) else dict(expect)
        saved = cfg.to_dict()
        diffs = [f"{k}: saved {saved[k]!r}, expected {want[k]!r}" for k in ARCH_KEYS
                 if k in want and _norm(want[k]) != _norm(saved[k])]
        if diffs:
            raise UserError(f"tokenizer at {p} does not match the config ({'; '.join(diffs)})")
    try:
        state = load_file(str(p / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"tokenizer weights {p / WEIGHTS} are unreadable or truncated: {e}") from None
    model = VQTokenizer(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"tokenizer weights {p / WEIGHTS} do not fit its config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"tokenizer weights {p / WEIGHTS} do not fit its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model.to(device).eval()


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v
