"""One id space for text and images: text tokens | special tokens | image codes.

`ImageLayout` is the single place that decides what an image span looks like
(<boi>, H rows of W codes each optionally closed by <eol>, <eoi>); the packer, the sampler's
grid constraint and the decoding of generated sequences all ask it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from data.runtime import UserError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<eol>", "<img>")  # <img>: a placeholder the adapter fills


@dataclass(frozen=True)
class ImageLayout:
    grid: int  # codes per side (H = W)
    row_separator: bool = True  # Emu3's row-end token: the model always knows where a row ends

    @property
    def span_len(self) -> int:
        """Tokens from <boi> to <eoi> inclusive."""
        return 2 + self.grid * self.grid + (self.grid if self.row_separator else 0)

    @property
    def row_len(self) -> int:
        return self.grid + int(self.row_separator)

    def kind_at(self, offset: int) -> str:
        """What must stand `offset` tokens after <boi> (offset >= 1): 'code', 'eol' or 'eoi'."""
        body = offset - 1
        if body >= self.grid * self.row_len:
            return "eoi"
        return "eol" if self.row_separator and body % self.row_len == self.grid else "code"

    def cell(self, offset: int) -> tuple[int, int]:
        """(row + 1, column + 1) of the code `offset` tokens after <boi>; (0, 0) where no code stands."""
        if self.kind_at(offset) != "code":
            return (0, 0)
        return ((offset - 1) // self.row_len + 1, (offset - 1) % self.row_len + 1)


class MultimodalVocab:
    """Text ids [0, T), specials [T, T+S), image codes [T+S, T+S+K)."""

    def __init__(self, text_tokenizer, num_codes: int, layout: ImageLayout):
        self.text_tokenizer = text_tokenizer
        self.text_size = len(text_tokenizer)
        self.num_codes = num_codes
        self.layout = layout
        self.special = {name: self.text_size + i for i, name in enumerate(SPECIALS)}
        self.code_offset = self.text_size + len(SPECIALS)
        self.size = self.code_offset + num_codes
        self.pad, self.bos, self.eos = self.special["<pad>"], self.special["<bos>"], self.special["<eos>"]
        self.boi, self.eoi, self.eol = self.special["<boi>"], self.special["<eoi>"], self.special["<eol>"]
        self.placeholder = self.special["<img>"]

    # ------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return self.text_tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode_text(self, ids: Iterable[int]) -> str:
        return self.text_tokenizer.decode([i for i in ids if i < self.text_size], skip_special_tokens=True)

    # ------------------------------------------------------------ images
    def image_layout(self) -> dict:
        """What the decoder needs to place image codes on the grid (DecoderConfig.image_layout)."""
        return {"boi": self.boi, "eoi": self.eoi, "code_offset": self.code_offset, "num_codes": self.num_codes,
                "grid": self.layout.grid, "row_len": self.layout.row_len}

    def is_code(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.code_offset) & (ids < self.size)

    def encode_image(self, codes: np.ndarray) -> list[int]:
        g = self.layout.grid
        codes = np.asarray(codes)
        if codes.shape != (g, g):
            raise ValueError(f"expected a {g}x{g} code grid, got {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(f"codes out of range [0, {self.num_codes})")
        rows = codes.astype(np.int64) + self.code_offset
        if self.layout.row_separator:
            rows = np.concatenate([rows, np.full((g, 1), self.eol)], axis=1)
        return [self.boi, *rows.reshape(-1).tolist(), self.eoi]

    def placeholder_span(self, n: int) -> list[int]:
        """An image as the adapter baseline sees it: n placeholders its features will overwrite."""
        return [self.boi, *[self.placeholder] * n, self.eoi]

    def decode_image(self, span: list[int]) -> np.ndarray:
        """A full span <boi> ... <eoi> -> codes [g, g]; raises ValueError if it breaks the layout."""
        if len(span) != self.layout.span_len or span[0] != self.boi or span[-1] != self.eoi:
            raise ValueError(f"not an image span of {self.layout.span_len} tokens")
        want = {"code": None, "eol": self.eol, "eoi": self.eoi}
        codes = []
        for off, tok in enumerate(span[1:], start=1):
            kind = self.layout.kind_at(off)
            if kind == "code":
                if not self.is_code(tok):
                    raise ValueError(f"token {tok} at offset {off} is not an image code")
                codes.append(tok - self.code_offset)
            elif tok != want[kind]:
                raise ValueError(f"expected {kind} at offset {off}, got {tok}")
        g = self.layout.grid
        return np.asarray(codes, dtype=np.int64).reshape(g, g)

    # ------------------------------------------------------------ mixed sequences
    def split(self, ids: list[int]) -> list[str | np.ndarray]:
        """A generated sequence -> its text pieces and image code grids, in order (broken spans dropped)."""
        out: list[str | np.ndarray] = []
        text: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] == self.boi:
                if text:
                    out.append(self.decode_text(text))
                    text = []
                span = ids[i:i + self.layout.span_len]
                try:
                    out.append(self.decode_image(span))
                except ValueError:
                    pass
                i += self.layout.span_len
                continue
            if ids[i] == self.eos:
                break
            text.append(ids[i])
            i += 1
        if text:
            out.append(self.decode_text(text))
        return out

    # ------------------------------------------------------------ persistence
    def describe(self) -> dict:
        return {"text_size": self.text_size, "num_codes": self.num_codes, "specials": list(SPECIALS),
                "layout": asdict(self.layout), "text_tokenizer_hash": text_tokenizer_hash(self.text_tokenizer)}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.text_tokenizer.save_pretrained(str(out / "text_tokenizer"))
        (out / "vocab.json").write_text(json.dumps({**self.describe(), "fingerprint": self.fingerprint()}, indent=2))
        return out

    @staticmethod
    def load(path: str | Path, expect_fingerprint: str | None = None) -> "MultimodalVocab":
        p = Path(path)
        if not (p / "vocab.json").is_file():
            raise UserError(f"no vocabulary at {p}: expected vocab.json and text_tokenizer/")
        meta = json.loads((p / "vocab.json").read_text())
        vocab = MultimodalVocab(load_text_tokenizer(p / "text_tokenizer"), meta["num_codes"],
                                ImageLayout(**meta["layout"]))
        if vocab.fingerprint() != meta["fingerprint"]:
            raise UserError(f"vocabulary at {p} does not match its own vocab.json (text tokenizer changed?)")
        if expect_fingerprint and vocab.fingerprint() != expect_fingerprint:
            raise UserError(f"vocabulary at {p} ({vocab.fingerprint()}) is not the one the checkpoint was "
                            f"trained with ({expect_fingerprint})")
        return vocab


# ---------------------------------------------------------------- text tokenizers

def text_tokenizer_hash(tok) -> str:
    return hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]


def load_text_tokenizer(path: str | Path):
    """A transformers tokenizer from a local directory or a tokenizer.json file (never the hub)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        check_bpe(p / "tokenizer.json")
    if p.is_file() and p.suffix == ".json":
        check_bpe(p)
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if not p.is_dir():
        raise UserError(f"no text tokenizer at {p} (give a directory or a tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a text tokenizer from {p}: {str(e).splitlines()[0]}") from None


def check_bpe(path: Path) -> None:
    """A tokenizer.json that `tokenizers` reads and whose model is BPE (GPT-2, Llama 3, Qwen, ours); one line if not."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path} is not a tokenizer.json ({type(e).__name__}); give the tokenizer.json of a BPE "
                        "tokenizer (e.g. a pretrained LM's) or leave text.tokenizer null to train one") from None
    kind = model.get("type") or ("BPE" if "merges" in model else None)
    if kind != "BPE":
        raise UserError(f"{path} holds a {kind or 'model-less'} tokenizer, not BPE; give a BPE tokenizer.json "
                        "(e.g. a GPT-2, Llama 3 or Qwen one) or leave text.tokenizer null to train one")


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2):
    """Byte-level BPE trained with `tokenizers` (any text encodes, no unknown tokens), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)
