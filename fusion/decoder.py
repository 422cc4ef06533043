"""The one decoder-only transformer, built from transformers' model classes (no hub download).

QK-norm on (Chameleon found it necessary) selects Qwen3's attention, which RMS-normalises
queries and keys per head; off selects plain Llama. Embedding dropout, the z-loss and the
per-modality losses are ours. The decoder takes `input_ids` (early fusion) or `inputs_embeds`
(the adapter baseline inserts projected image features) and never knows which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.runtime import UserError, config_from_dict


@dataclass
class DecoderConfig:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # default: 8/3 * hidden, rounded to 32 (SwiGLU)
    max_seq_len: int = 512
    qk_norm: bool = True
    z_loss: float = 1e-5  # Chameleon: 1e-5 * log^2 Z keeps the output softmax from drifting
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    init_from: str | None = None  # a local pretrained causal LM directory to start from
    # 2-D positions: a learned row and a learned column embedding added to each image code's input, so a
    # code knows where in the grid it sits (1-D RoPE alone puts vertical neighbours a row apart). Needs
    # `image_layout` (MultimodalVocab.image_layout(): boi id, code id range, grid, row length).
    image_pos_embed: bool = False
    image_layout: dict | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_pos_embed and not self.image_layout:
            raise ValueError("image_pos_embed needs image_layout (the vocabulary's boi id, code range and grid)")
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.intermediate_size = self.intermediate_size or int(self.hidden_size * 8 / 3) // 32 * 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        return config_from_dict(cls, d, "decoder")

    def hf_config(self, vocab_size: int):
        from transformers import LlamaConfig, Qwen3Config

        kw = dict(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                  num_key_value_heads=self.num_kv_heads, head_dim=self.hidden_size // self.num_heads,
                  max_position_embeddings=self.max_seq_len, attention_dropout=self.attention_dropout,
                  tie_word_embeddings=self.tie_embeddings, initializer_range=self.init_std,
                  rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        cfg = Qwen3Config(**kw) if self.qk_norm else LlamaConfig(**kw)
        cfg._attn_implementation = "sdpa"
        return cfg

    def non_embedding_params(self) -> int:
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        kv = self.num_kv_heads * (h // self.num_heads)
        return L * (2 * h * h + 2 * h * kv + 3 * h * f)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls (N without embeddings, with the output head)
        plus attention's 6 * L * T * h (PaLM's accounting, causal half not discounted)."""
        return 6 * self.non_embedding_params() + 6 * self.num_layers * seq_len * self.hidden_size


class Decoder(nn.Module):
    """A causal LM over the joint vocabulary, returning logits and (given labels) its losses."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM

        self.cfg = cfg
        if cfg.init_from:
            try:
                self.lm = AutoModelForCausalLM.from_pretrained(cfg.init_from, local_files_only=True)
            except OSError as e:
                raise UserError(f"cannot load a causal LM from {cfg.init_from}: {str(e).splitlines()[0]}") from None
            if self.lm.config.vocab_size > vocab_size:
                raise UserError(f"pretrained LM at {cfg.init_from} has {self.lm.config.vocab_size} tokens, "
                                f"more than the joint vocabulary ({vocab_size}): its text tokenizer must be the vocab's")
            # new rows (specials + image codes) start at the mean of the old ones (transformers' default)
            self.lm.resize_token_embeddings(vocab_size, mean_resizing=True)
        else:
            hf = cfg.hf_config(vocab_size)
            self.lm = (Qwen3ForCausalLM if cfg.qk_norm else LlamaForCausalLM)(hf)
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        if cfg.image_pos_embed:  # index 0: not an image code (kept at zero)
            grid = cfg.image_layout["grid"]
            self.image_rows = nn.Embedding(grid + 1, cfg.hidden_size, padding_idx=0)
            self.image_cols = nn.Embedding(grid + 1, cfg.hidden_size, padding_idx=0)
            for e in (self.image_rows, self.image_cols):
                nn.init.normal_(e.weight, std=cfg.init_std)
                e.weight.data[0].zero_()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def grid_cells(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[..., T, 2]: each image code's (row + 1, column + 1) in its image, 0 for every other token.

        Read off the sequence itself: a code's place is its distance from the last <boi> before it
        (rows are `row_len` long, the <eol> included). Whole sequences only; a sampler feeding one
        token at a time passes the cells it knows instead (fusion/generate.py).
        """
        lay = self.cfg.image_layout
        idx = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        last_boi = torch.where(input_ids == lay["boi"], idx, -1).cummax(-1).values
        body = idx - last_boi - 1
        row, col = body.div(lay["row_len"], rounding_mode="floor"), body % lay["row_len"]
        code = ((input_ids >= lay["code_offset"]) & (input_ids < lay["code_offset"] + lay["num_codes"])
                & (last_boi >= 0) & (row < lay["grid"]) & (col < lay["grid"]))
        return torch.stack([torch.where(code, row + 1, 0), torch.where(code, col + 1, 0)], dim=-1)

    def embed(self, input_ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: the token's, plus its grid cell's when 2-D positions are on."""
        x = self.embed_tokens(input_ids)
        if self.cfg.image_pos_embed:
            cells = self.grid_cells(input_ids) if cells is None else cells
            x = x + self.image_rows(cells[..., 0]) + self.image_cols(cells[..., 1])
        return x

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        inputs_embeds = self.embed_dropout(inputs_embeds)
        return self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=past_key_values,
                       use_cache=use_cache, logits_to_keep=logits_to_keep)


def lm_losses(logits: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor, z_loss: float,
              image_weight: float = 1.0, text_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Next-token losses from logits [b, t, V]; labels [b, t] hold the target of each position
    (-100 = no loss); modality [b, t] is 0 for text targets, 1 for image targets.

    Returns the weighted total, the text and image cross-entropies (per token) and the z-loss.
    """
    logits = logits.float()
    mask = labels != -100
    flat_logits, flat_labels = logits[mask], labels[mask]
    ce = F.cross_entropy(flat_logits, flat_labels, reduction="none")
    is_image = modality[mask] == 1
    n_img, n_txt = is_image.sum(), (~is_image).sum()
    image_ce = (ce * is_image).sum() / n_img.clamp_min(1)
    text_ce = (ce * ~is_image).sum() / n_txt.clamp_min(1)
    lse = torch.logsumexp(flat_logits, dim=-1)
    zl = z_loss * (lse ** 2).mean() if z_loss else lse.new_zeros(())
    # token-weighted mix, so the total is a per-token loss when both weights are 1
    total = (image_weight * (ce * is_image).sum() + text_weight * (ce * ~is_image).sum()) / mask.sum().clamp_min(1)
    return {"loss": total + zl, "text_ce": text_ce, "image_ce": image_ce, "z_loss": zl,
            "text_tokens": n_txt, "image_tokens": n_img}


@torch.no_grad()
def seed_code_embeddings(decoder: Decoder, code_offset: int, num_codes: int, grid: int, tokenizer,
                         seed: int = 0) -> torch.Tensor:
    """Give each image code's input embedding a head start: what the code looks like.

    Every code is decoded by the image tokenizer as a grid filled with it; the picture's 2 x 2 mean
    colours (12 numbers, standardised over codes) go through a fixed random projection, and the result
    is mixed with the random initialisation at equal scale. Only an initialisation: nothing is frozen,
    and the decoder's architecture is unchanged. Returns the 12-number features (for tests).
    """
    feats = []
    for chunk in torch.arange(num_codes).split(128):
        images = tokenizer.decode(chunk.view(-1, 1, 1).expand(-1, grid, grid).contiguous())
        feats.append(F.adaptive_avg_pool2d(images.float(), 2).flatten(1))
    f = torch.cat(feats)
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    g = torch.Generator().manual_seed(seed)
    emb = decoder.embed_tokens.weight
    proj = torch.randn(f.shape[1], emb.shape[1], generator=g) / math.sqrt(f.shape[1])
    rows = slice(code_offset, code_offset + num_codes)
    look = (f @ proj).to(emb.dtype) * decoder.cfg.init_std
    emb[rows] = (emb[rows] + look) / math.sqrt(2)
    return f

