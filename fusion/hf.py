"""The decoder as a transformers model of its own type, "vqfusion": what `fusion.export` writes and what
`AutoConfig` / `AutoModelForCausalLM` load after `import fusion` (the package registers both classes; nothing
is downloaded and no remote code runs).

It is Qwen3 (QK-norm attention) with one addition: the 2-D position of each image code, a learned row and a
learned column embedding added to the code's input embedding (and, for a model trained with
`decoder.image_pos_values`, per-block row and column tables added to the codes' attention values). The cells
are read off the token sequence (`fusion.decoder.grid_cells`); when a forward sees only the newest tokens
(generation with a KV cache, also the unconditional stream of transformers' classifier-free guidance), the ids
seen so far ride on the cache object. Code features (FSQ levels, decoded pixels) are folded into plain
embedding and head tables by the export, so the model here needs nothing but its weights. A model trained with
`read_attention: bidirectional` reads the complete images of its prompt both ways: the prefill builds that mask
(`fusion.decoder.read_spans`), every later token is causal, as in the project's sampler.

`ImageGridLogitsProcessor` is the sampler's grid constraint for `generate()`: inside an image span exactly
the layout's token may come next (a code, <eol>, <eoi>); outside one, no code, <eol> or <eoi>.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from data.runtime import UserError
from fusion.decoder import attention_mask as read_mask
from fusion.decoder import _add_value_pos, grid_cells, read_spans
from fusion.vocab import ImageLayout

MODEL_TYPE = "vqfusion"
SEEN = "vqfusion_seen_ids"  # the ids a cache has seen, so a forward over only the newest tokens can place them
VALUE_POS = "vqfusion_value_pos"  # what this forward adds to a block's v_proj output (`image_pos_values`)


class VQFusionConfig(Qwen3Config):
    """Qwen3's config plus the image layout (boi id, code id range, grid, row length), whether image codes
    get 2-D position embeddings, and whether every block adds them to the codes' attention values too."""

    model_type = MODEL_TYPE

    def __init__(self, image_layout: dict | None = None, image_pos_embed: bool = False,
                 read_attention: str = "causal", image_pos_values: bool = False, **kwargs):
        self.image_layout = image_layout
        self.image_pos_embed = image_pos_embed
        self.image_pos_values = image_pos_values
        self.read_attention = read_attention
        super().__init__(**kwargs)
        if image_pos_embed and not image_layout:
            raise ValueError("image_pos_embed needs image_layout")
        if image_pos_values and not image_pos_embed:
            raise ValueError("image_pos_values needs image_pos_embed")


class VQFusionForCausalLM(Qwen3ForCausalLM):
    config_class = VQFusionConfig

    def __init__(self, config: VQFusionConfig):
        super().__init__(config)
        if config.image_pos_embed:  # index 0: not an image code (kept at zero)
            grid = config.image_layout["grid"]
            self.image_rows = nn.Embedding(grid + 1, config.hidden_size, padding_idx=0)
            self.image_cols = nn.Embedding(grid + 1, config.hidden_size, padding_idx=0)
        if config.image_pos_values:  # per block, added to its v_proj's output (fusion.decoder's value positions)
            grid, width = config.image_layout["grid"], config.num_key_value_heads * config.head_dim
            self.value_rows = nn.ModuleList(nn.Embedding(grid + 1, width, padding_idx=0) for _ in self.model.layers)
            self.value_cols = nn.ModuleList(nn.Embedding(grid + 1, width, padding_idx=0) for _ in self.model.layers)
            for layer in self.model.layers:  # its own attribute, not fusion.decoder's: a Decoder started from
                # this export, with its own value tables and hooks, adds the positions once
                layer.self_attn.v_proj.register_forward_hook(functools.partial(_add_value_pos, attr=VALUE_POS))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, after checking that a local export folder is whole (one line if not)."""
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir():
            check_export(path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def embed(self, input_ids: torch.Tensor, image_cells: torch.Tensor | None = None) -> torch.Tensor:
        x = self.get_input_embeddings()(input_ids)
        if self.config.image_pos_embed:
            cells = grid_cells(input_ids, self.config.image_layout) if image_cells is None else image_cells
            x = x + self.image_rows(cells[..., 0]) + self.image_cols(cells[..., 1])
        return x

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, image_cells=None, **kwargs):
        """Qwen3's forward; `image_cells` [b, t, 2], the codes' (row + 1, column + 1), may be given; by default
        they are read off the ids (those on the cache first, when it holds earlier tokens)."""
        seen = None
        kv = cache if cache is not None else kwargs.get("past_key_values")  # generate() passes the latter
        prefill = kv is None or kv.get_seq_length() == 0
        if (self.config.read_attention == "bidirectional" and prefill and input_ids is not None
                and (attention_mask is None or attention_mask.ndim == 2)):
            spans = read_spans(input_ids, self.config.image_layout["boi"], self.config.image_layout["eoi"])
            if spans.any():  # the prompt's images are read both ways (one document per row, left padding masked)
                valid = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                one_doc = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                attention_mask = read_mask(one_doc, spans, valid=valid)
        if inputs_embeds is None and input_ids is not None:
            if (self.config.image_pos_embed or self.config.image_pos_values) and image_cells is None:
                past = getattr(cache, SEEN, None) if cache is not None and cache.get_seq_length() > 0 else None
                seen = input_ids if past is None else torch.cat([past, input_ids], dim=1)
                image_cells = grid_cells(seen, self.config.image_layout)[:, -input_ids.shape[1]:]
            inputs_embeds, input_ids = self.embed(input_ids, image_cells), None
        if self.config.image_pos_values and image_cells is not None:  # each block's v_proj hook takes its own
            for i, layer in enumerate(self.model.layers):
                setattr(layer.self_attn.v_proj, VALUE_POS,
                        self.value_rows[i](image_cells[..., 0]) + self.value_cols[i](image_cells[..., 1]))
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                              logits_to_keep=logits_to_keep, **kwargs)
        if seen is not None and out.get("cache") is not None:
            setattr(out["cache"], SEEN, seen)
        return out


def check_export(path: Path) -> None:
    """An export folder holds its weights, its text tokenizer and an image tokenizer that makes as many codes
    as the model has code rows; one line naming the fix if not."""
    again = f"write it again: python -m fusion.export model_dir=RUN/model out={path}"
    for name, what in (("config.json", "the model config"), ("model.safetensors", "the weights"),
                       ("tokenizer.json", "the text + image-code tokenizer"),
                       ("image_tokenizer/config.json", "the image tokenizer"),
                       ("image_tokenizer/model.safetensors", "the image tokenizer's weights")):
        if not (path / name).is_file():
            raise UserError(f"export folder {path} lacks {name} ({what}); {again}")
    from tokenizer.checkpoint import read_tokenizer_meta

    config = VQFusionConfig.from_pretrained(str(path))
    layout = config.image_layout or {}
    tok = read_tokenizer_meta(path / "image_tokenizer")["config"]
    made = math.prod(tok["fsq_levels"]) if tok.get("quantizer") == "fsq" else tok.get("codebook_size")
    if layout and made != layout.get("num_codes"):
        raise UserError(f"export folder {path}: the image tokenizer makes {made} codes, the model has "
                        f"{layout.get('num_codes')} code rows; {again}")


class ImageGridLogitsProcessor:
    """transformers LogitsProcessor: every image span gets exactly the layout's grid (codes, <eol> at row ends
    when the layout has them, <eoi> after the last row); text never holds a code, <eol> or <eoi>."""

    def __init__(self, config: VQFusionConfig):
        lay = config.image_layout
        self.layout = ImageLayout(lay["grid"], row_separator=lay["row_len"] > lay["grid"])  # what comes where
        self.boi, self.eoi, self.eol = lay["boi"], lay["eoi"], lay["eol"]
        self.codes = slice(lay["code_offset"], lay["code_offset"] + lay["num_codes"])

    def allowed(self, row: torch.Tensor, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        where = (row == self.boi).nonzero()
        offset = row.shape[0] - int(where[-1]) if len(where) else self.layout.span_len  # the next token's place
        if offset >= self.layout.span_len:  # no span open: text
            mask[:] = True
            mask[self.codes] = False
            mask[[self.eol, self.eoi]] = False
            return mask
        kind = self.layout.kind_at(offset)
        if kind == "code":
            mask[self.codes] = True
        else:
            mask[self.eol if kind == "eol" else self.eoi] = True
        return mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.stack([self.allowed(r, scores.shape[-1]) for r in input_ids.cpu()]).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know "vqfusion" (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, VQFusionConfig)
        AutoModelForCausalLM.register(VQFusionConfig, VQFusionForCausalLM)
    except ValueError:  # registered already
        pass
