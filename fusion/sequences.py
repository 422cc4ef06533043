"""Documents (any ordered mix of text spans and images) -> packed fixed-length training sequences.

Each position carries its input id, its target (-100 where no loss: prompts, padding, the
last token of a document), its position within its own document (positions restart at every
document, which is how the decoder keeps packed documents from attending to each other), and a
modality label (0 text, 1 image) so text and image losses are logged and weighted separately, and a
read-span label: which image span (<boi> through <eoi>) the position belongs to when that image is read, not
written (no loss on its codes), so a decoder with `read_attention: bidirectional` lets its tokens see each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fusion.vocab import MultimodalVocab

IGNORE = -100


@dataclass
class Segment:
    """A text span or an image (codes for early fusion, pixels for the adapter); `loss` says whether
    the model is trained to produce it."""

    text: str | None = None
    codes: np.ndarray | None = None
    pixels: torch.Tensor | None = None
    loss: bool = True

    @staticmethod
    def txt(text: str, loss: bool = True) -> "Segment":
        return Segment(text=text, loss=loss)

    @staticmethod
    def img(image: np.ndarray | torch.Tensor, loss: bool = True) -> "Segment":
        """Codes [g, g] (integers) or pixels [3, H, W] (a uint8 tensor)."""
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            return Segment(pixels=image, loss=False)  # nothing to predict: features are inputs only
        return Segment(codes=image, loss=loss)


@dataclass
class TokenizedDoc:
    ids: list[int]
    loss: list[bool]  # is ids[i] a training target
    modality: list[int]  # 1 if ids[i] belongs to an image span (<boi> through <eoi>)
    images: list[torch.Tensor] = field(default_factory=list)  # pixels of the placeholder spans, in order
    key: str = ""  # the sample it came from
    read: list[int] = field(default_factory=list)  # k > 0: ids[i] is in the document's k-th read image span

    def __post_init__(self):
        if not self.read:
            self.read = [0] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(vocab: MultimodalVocab, segments: list[Segment], add_eos: bool = True,
             placeholders: int = 0, key: str = "") -> TokenizedDoc:
    """<bos> segment... <eos>; <eos> is a target when the last segment is.

    Pixel images become <boi> + `placeholders` x <img> + <eoi> (the adapter fills them with features).
    """
    ids, loss, modality, images, read = [vocab.bos], [False], [0], [], [0]
    spans = 0
    for seg in segments:
        if seg.codes is not None:
            part, mod = vocab.encode_image(seg.codes), 1
        elif seg.pixels is not None:
            if placeholders <= 0:
                raise ValueError("a pixel image needs placeholders > 0 (the adapter's tokens per image)")
            part, mod = vocab.placeholder_span(placeholders), 1
            images.append(seg.pixels)
        else:
            part, mod = vocab.encode_text(seg.text or ""), 0
        spans += mod == 1 and not seg.loss
        ids += part
        loss += [seg.loss] * len(part)
        modality += [mod] * len(part)
        read += [spans if mod == 1 and not seg.loss else 0] * len(part)
    if add_eos:
        ids.append(vocab.eos)
        loss.append(bool(segments) and segments[-1].loss)
        modality.append(0)
        read.append(0)
    return TokenizedDoc(ids, loss, modality, images, key, read)


@dataclass
class Packed:
    """One training sequence of `seq_len` positions."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    modality: np.ndarray
    read_span: np.ndarray | None = None  # k > 0: the position is in the sequence's k-th read image span
    documents: int = 0
    images: list[torch.Tensor] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "position_ids", "modality", "read_span")
        return {k: torch.from_numpy(getattr(self, k)) for k in keys}


@dataclass
class Packer:
    """First-fit packing into a few open sequences; a full or oldest one is emitted.

    Documents longer than `seq_len` are cut (and counted); none is split across sequences.
    """

    seq_len: int
    pad_id: int
    open_bins: int = 4
    bins: list[list[TokenizedDoc]] = field(default_factory=list)
    truncated: int = 0

    def _room(self, b: list[TokenizedDoc]) -> int:
        return self.seq_len - sum(len(d) for d in b)

    def add(self, doc: TokenizedDoc) -> list[Packed]:
        if len(doc) > self.seq_len:
            if doc.images:  # cutting through a placeholder span would orphan its features
                self.truncated += 1
                return []
            doc = TokenizedDoc(doc.ids[: self.seq_len], doc.loss[: self.seq_len], doc.modality[: self.seq_len],
                               key=doc.key, read=doc.read[: self.seq_len])
            self.truncated += 1
        for b in self.bins:
            if self._room(b) >= len(doc):
                b.append(doc)
                break
        else:
            self.bins.append([doc])
        out = [self._emit(b) for b in self.bins if self._room(b) == 0]
        self.bins = [b for b in self.bins if self._room(b) > 0]
        if len(self.bins) > self.open_bins:
            fullest = min(self.bins, key=self._room)
            self.bins.remove(fullest)
            out.append(self._emit(fullest))
        return out

    def flush(self) -> list[Packed]:
        out = [self._emit(b) for b in self.bins]
        self.bins = []
        return out

    def _emit(self, docs: list[TokenizedDoc]) -> Packed:
        return pack(docs, self.seq_len, self.pad_id)


def pack(docs: list[TokenizedDoc], seq_len: int, pad_id: int) -> Packed:
    """Lay documents end to end; the target at position t is the next token of the same document."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    pos = np.zeros(seq_len, dtype=np.int64)
    mod = np.zeros(seq_len, dtype=np.int64)
    read = np.zeros(seq_len, dtype=np.int64)
    t, images, spans = 0, [], 0
    for d in docs:
        images += d.images
        n = len(d)
        ids[t:t + n] = d.ids
        pos[t:t + n] = np.arange(n)
        nxt = np.asarray(d.ids[1:], dtype=np.int64)
        target = np.where(np.asarray(d.loss[1:]), nxt, IGNORE)
        labels[t:t + n - 1] = target
        mod[t:t + n - 1] = d.modality[1:]  # the modality of what is being predicted
        r = np.asarray(d.read, dtype=np.int64)
        read[t:t + n] = np.where(r > 0, r + spans, 0)
        spans += int(r.max(initial=0))
        t += n
    pos[t:] = np.arange(seq_len - t)  # padding is its own 'document': it attends to nothing real
    return Packed(ids, labels, pos, mod, read, documents=len(docs), images=images, keys=[d.key for d in docs])
