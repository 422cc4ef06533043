"""A trained model as one self-contained folder, safetensors only (nothing on disk executes code on load):

    decoder.safetensors  decoder.json  vocab/  image_tokenizer/

decoder.json records the fingerprints of the vocabulary and image tokenizer it was trained with;
loading refuses any other, naming the mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.runtime import UserError
from fusion.adapter import ImageEncoder, TowerConfig
from fusion.decoder import Decoder, DecoderConfig
from fusion.vocab import MultimodalVocab
from tokenizer.checkpoint import load_tokenizer, read_tokenizer_meta
from tokenizer.model import VQTokenizer

WEIGHTS, META, IMAGE_ENCODER = "decoder.safetensors", "decoder.json", "image_encoder.safetensors"


@dataclass
class Bundle:
    decoder: Decoder
    vocab: MultimodalVocab
    tokenizer: VQTokenizer
    meta: dict
    image_encoder: ImageEncoder | None = None  # the adapter baseline's tower + connector

    @property
    def arm(self) -> str:
        return "adapter" if self.image_encoder is not None else "fusion"

    @property
    def question_first(self) -> bool:
        """Whether the model was trained to read a question before its image (TaskMix.question_first)."""
        return bool((self.meta.get("reading") or {}).get("question_first"))

    @property
    def describe_first(self) -> bool:
        """Whether the model was trained to describe an image cell by cell before its questions
        (TaskMix.describe_first): the evaluation lets it write that description first."""
        return bool((self.meta.get("reading") or {}).get("describe_first"))

    @property
    def restate_referent(self) -> bool:
        """Whether the model was trained to name a question's object again after "A:" (TaskMix.restate_referent)."""
        return bool((self.meta.get("reading") or {}).get("restate_referent"))

    @property
    def worked_answers(self) -> bool:
        """Whether the model was trained to write its working before relation and count answers
        (TaskMix.worked_answers): the evaluation lets it, then scores what follows the last ": "."""
        return bool((self.meta.get("reading") or {}).get("worked_answers"))

    @property
    def placeholders(self) -> int:
        return self.image_encoder.tokens_per_image if self.image_encoder is not None else 0


def _save_safetensors(state: dict, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def _load_safetensors(path: Path, device: str) -> dict:
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise UserError(f"weights {path} are unreadable or truncated: {e}") from None


def save_bundle(out_dir: str | Path, decoder: Decoder, vocab: MultimodalVocab, tokenizer_dir: str | Path,
                extra: dict | None = None, image_encoder: ImageEncoder | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = decoder.state_dict()
    if decoder.cfg.tie_embeddings:  # safetensors refuses shared storage; the head is re-tied on load
        state = {k: v for k, v in state.items() if k != "lm.lm_head.weight"}
    _save_safetensors(state, out / WEIGHTS)
    if image_encoder is not None:
        _save_safetensors(image_encoder.state_dict(), out / IMAGE_ENCODER)
    vocab.save(out / "vocab")
    tok_out = out / "image_tokenizer"
    if Path(tokenizer_dir).resolve() != tok_out.resolve():
        shutil.copytree(tokenizer_dir, tok_out, dirs_exist_ok=True)
    decoder_cfg = decoder.cfg.to_dict()
    decoder_cfg["init_from"] = None  # the weights are here now
    meta = {"decoder": decoder_cfg, "vocab_size": vocab.size, "vocab_fingerprint": vocab.fingerprint(),
            "tokenizer_fingerprint": read_tokenizer_meta(tok_out)["fingerprint"], **(extra or {})}
    if image_encoder is not None:
        meta["image_encoder"] = {"tower": {**image_encoder.cfg.to_dict(), "pretrained": None},
                                 "connector": image_encoder.connector.kind}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_bundle(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Bundle:
    """A saved model folder, ready to read and write. `dtype`: the decoder's weights in it (data.runtime's
    inference_dtype: bf16 where it is the faster here); the image tokenizer and an adapter's encoder stay fp32."""
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"no trained model at {p}: expected {META} and {WEIGHTS}")
    try:
        meta = json.loads((p / META).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p / META} is not valid JSON: {e}") from None
    vocab = MultimodalVocab.load(p / "vocab", expect_fingerprint=meta["vocab_fingerprint"])
    tok_meta = read_tokenizer_meta(p / "image_tokenizer")
    if tok_meta["fingerprint"] != meta["tokenizer_fingerprint"]:
        raise UserError(f"image tokenizer in {p} ({tok_meta['fingerprint']}) is not the one the decoder was trained "
                        f"with ({meta['tokenizer_fingerprint']})")
    if tok_meta["num_codes"] != vocab.num_codes or tok_meta["grid"] != vocab.layout.grid:
        raise UserError(f"image tokenizer in {p} has {tok_meta['num_codes']} codes on a {tok_meta['grid']} grid; "
                        f"the vocabulary expects {vocab.num_codes} on {vocab.layout.grid}")
    state = _load_safetensors(p / WEIGHTS, device)
    decoder = Decoder(DecoderConfig.from_dict(meta["decoder"]), meta["vocab_size"], fresh_init=False)
    try:
        decoder.load_state_dict(state, strict=not decoder.cfg.tie_embeddings)
    except RuntimeError as e:
        raise UserError(f"decoder weights {p / WEIGHTS} do not fit decoder.json: {str(e).splitlines()[-1].strip()}") from None
    if decoder.cfg.tie_embeddings:
        decoder.lm.tie_weights()
    image_encoder = None
    if "image_encoder" in meta:
        enc = meta["image_encoder"]
        image_encoder = ImageEncoder(TowerConfig.from_dict(enc["tower"]), enc["connector"], decoder.cfg.hidden_size)
        try:
            image_encoder.load_state_dict(_load_safetensors(p / IMAGE_ENCODER, device))
        except RuntimeError as e:
            raise UserError(f"{p / IMAGE_ENCODER} does not fit decoder.json: {str(e).splitlines()[-1].strip()}") from None
        image_encoder = image_encoder.to(device).eval()
    return Bundle(decoder.to(device, dtype).eval(), vocab, load_tokenizer(p / "image_tokenizer", device=device), meta,
                  image_encoder)


def torch_load_weights_only(path: str | Path, **kw):
    """Lightning checkpoints: plain tensors and containers only; anything else is refused, not executed."""
    try:
        return torch.load(path, weights_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - pickle errors, truncation, foreign formats: all one line
        raise UserError(f"refusing to load {path}: {str(e).splitlines()[0][:300]}") from None
