"""The one decoder-only transformer, built from transformers' model classes (no hub download).

QK-norm on (Chameleon found it necessary) selects Qwen3's attention, which RMS-normalises
queries and keys per head; off selects plain Llama. Embedding dropout, the z-loss and the
per-modality losses are ours. The decoder takes `input_ids` (early fusion) or `inputs_embeds`
(the adapter baseline inserts projected image features) and never knows which.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field, replace

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
    # QK-norm fixes every query and key at RMS 1, so with gains of 1 an attention logit is at most sqrt(head_dim)
    # (8 at 64 dimensions): a head that must pick one object's ~10 codes out of ~160 tokens has to align its
    # query near-perfectly, or grow the gains first. `qk_gain` starts both gains at sqrt(qk_gain), so logits
    # start qk_gain times sharper (Henry et al.'s QKNorm learns one scale started at log2(L^2 - L), ~17 here).
    qk_gain: float = 1.0
    # Mimetic initialisation of where the heads look (Trockman & Kolter 2023, "Mimetic Initialization of
    # Self-Attention Layers"): [alpha, beta] starts each head's W_q^T W_k as the best rank-head_dim match of
    # alpha * Z + beta * I (Z Gaussian, entries of variance 1/hidden), so from the first step a token attends to
    # tokens like itself (the word "red" to what resembles it) rather than at random. Which heads grow into the
    # heads that find an asked object is otherwise a lottery on the random queries and keys (README screen 18).
    # null: independent random queries and keys. With GQA each query head keeps its own Z on its group's keys.
    mimetic_qk: tuple[float, float] | None = None
    # ... and of what they return: [alpha, beta] starts each head's W_o_h W_v_h (hidden x hidden, rank head_dim)
    # near alpha * Z - beta * I, the shape the paper measured in trained ViTs' value-output circuits (its values
    # 0.4, 0.4). null: random. Screen 18 found seed 1's queries and keys turn seed 0 half-way, with its values
    # and outputs all the way.
    mimetic_vo: tuple[float, float] | None = None
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
    # ... and added again before every later block, not only to the input. The cell a code sits in is read
    # linearly off its residual stream at the input (100 % on the demo model) but only 50 % by block 3, where
    # the heads that find an asked object work, and 32 % at the top: "Where is the square?" found the right
    # object 30 % of the time (README, study screen 8). The same two tables, no new parameters. Measured (one
    # seed): the cell after block 3 at 57 % instead of 49 %, position 46 % instead of 42, colour 56 instead of 78.
    image_pos_every_layer: bool = False
    # ... and in every block's attention values: a learned row and column vector per block (zero at the start),
    # added to each image code's value (Shaw et al.'s positions in the values, absolute here), so a head that
    # finds an object returns its cell with it. The long recipe's heads find the square named in "What colour is
    # the square?" (0.97 of their object attention) but not in "Where is the square?" (0.47, area 0.42): finding
    # only pays if what comes back carries the cell (README, study screen 9).
    image_pos_values: bool = False
    # The tables' start: 0 keeps the function of a model without them at step 0 (but a head that does not yet
    # find gets no cell back, and a readout that does not yet read gives no reason to find); > 0 starts them
    # at this standard deviation, so every head returns a cell from the first step (study screen 10).
    image_pos_values_std: float = 0.0
    # What an image code brings besides its own learned row. Each feature listed is a fixed vector per code,
    # and a learned projection of it is added to the code's input embedding (and, with `code_head`, to its
    # row of the output head), so codes that share a level or look alike share parameters from the first step:
    #   "levels": the code's FSQ level in each dimension, one-hot (`code_levels`): factorised embeddings,
    #             one learned vector per (dimension, level), summed;
    #   "pixels": the code's decoded patch (`code_pixel_dim` numbers), what the code looks like.
    # Both are reparametrisations of plain tables: `plain_tables()` folds them in (an export writes those).
    code_features: list[str] = field(default_factory=list)
    code_levels: list[int] | None = None
    code_pixel_dim: int | None = None
    code_head: bool = False
    # How the tokens of an image the model reads (a caption's or a question's image, given, not written: no
    # loss on its codes) attend to each other: "causal" like every other token, or "bidirectional" within the
    # image span (PaliGemma's prefix-LM, Gemma 3's image attention), so every code sees the whole picture
    # before any question is asked. Images the model writes stay causal either way.
    read_attention: str = "causal"
    # The codes of an image the model writes (and its <boi>) run through their own copy of every block's norms,
    # attention projections and MLP, text and read images through the first (fusion/experts.py: a writing
    # expert, BAGEL's and MoT's split by role). Same sequence, same attention, same FLOPs per token.
    write_expert: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_pos_embed and not self.image_layout:
            raise ValueError("image_pos_embed needs image_layout (the vocabulary's boi id, code range and grid)")
        if self.image_pos_values and not self.image_pos_embed:
            raise ValueError("image_pos_values needs image_pos_embed (the image layout and its 2-D cells)")
        if self.image_pos_every_layer and not self.image_pos_embed:
            raise ValueError("image_pos_every_layer needs image_pos_embed (the 2-D tables it adds again)")
        self.code_features = list(self.code_features)
        unknown = set(self.code_features) - {"levels", "pixels"}
        if unknown:
            raise ValueError(f"decoder.code_features: unknown {sorted(unknown)}; known: levels, pixels")
        if (self.code_features or self.code_head) and not self.image_layout:
            raise ValueError("code_features and code_head need image_layout (the vocabulary's code range)")
        if self.code_head and not self.code_features:
            raise ValueError("code_head needs code_features to tie the head's code rows to")
        if "levels" in self.code_features:
            if not self.code_levels:
                raise ValueError("code_features=[levels] needs an FSQ image tokenizer (code_levels)")
            if math.prod(self.code_levels) != self.image_layout["num_codes"]:
                raise ValueError(f"code_features=[levels]: FSQ levels {list(self.code_levels)} make "
                                 f"{math.prod(self.code_levels)} codes, the vocabulary has {self.image_layout['num_codes']}")
        if "pixels" in self.code_features and not self.code_pixel_dim:
            raise ValueError("code_features=[pixels] needs code_pixel_dim (the decoded patch's size)")
        if self.write_expert and not (self.image_layout and "eoi" in self.image_layout):
            raise ValueError("write_expert needs image_layout with its eoi (the vocabulary's image tokens)")
        if self.read_attention not in ("causal", "bidirectional"):
            raise ValueError(f"decoder.read_attention must be causal or bidirectional, got {self.read_attention!r}")
        if self.qk_gain <= 0 or (self.qk_gain != 1.0 and not self.qk_norm):
            raise ValueError(f"decoder.qk_gain={self.qk_gain} needs qk_norm=true and a value > 0")
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        for name in ("mimetic_qk", "mimetic_vo"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 2 or value[0] < 0 or value[1] < 0 or not any(value):
                    raise ValueError(f"decoder.{name} must be [alpha, beta] (>= 0, not both 0), got {value}")
                setattr(self, name, value)
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


def grid_cells(input_ids: torch.Tensor, layout: dict) -> torch.Tensor:
    """[..., T, 2]: each image code's (row + 1, column + 1) in its image, 0 for every other token.

    Read off the sequence itself: a code's place is its distance from the last <boi> before it
    (rows are `row_len` long, the <eol> included). Whole sequences only; a sampler feeding one
    token at a time passes the cells it knows instead (fusion/generate.py).
    """
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    last_boi = torch.where(input_ids == layout["boi"], idx, -1).cummax(-1).values
    body = idx - last_boi - 1
    row, col = body.div(layout["row_len"], rounding_mode="floor"), body % layout["row_len"]
    code = ((input_ids >= layout["code_offset"]) & (input_ids < layout["code_offset"] + layout["num_codes"])
            & (last_boi >= 0) & (row < layout["grid"]) & (col < layout["grid"]))
    return torch.stack([torch.where(code, row + 1, 0), torch.where(code, col + 1, 0)], dim=-1)


def read_spans(input_ids: torch.Tensor, boi: int, eoi: int) -> torch.Tensor:
    """[B, T]: k > 0 on the tokens (<boi> through <eoi>) of the k-th complete image span of each row, 0
    elsewhere. What a prompt's images are at inference: given, hence read (an open span at the end, which the
    sampler is about to write, is left out)."""
    opened = (input_ids == boi).long().cumsum(-1)
    closed_before = (input_ids == eoi).long().cumsum(-1) - (input_ids == eoi).long()
    complete = opened <= (input_ids == eoi).long().sum(-1, keepdim=True)
    inside = (opened > closed_before) & complete
    return torch.where(inside, opened, 0)


def same_span(spans: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: True where query and key lie inside the same read image span (`spans` as read_spans gives)."""
    return (spans[:, :, None] == spans[:, None, :]) & (spans[:, :, None] > 0)


def attention_mask(position_ids: torch.Tensor, spans: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, T] boolean (True = may attend): causal within each packed document (a document starts where
    its position ids restart at 0), plus every pair inside one read image span (`spans`, k > 0). `valid` [B, T]
    marks real tokens (left padding: 0); a padding query sees itself, so no softmax row is empty."""
    T = position_ids.shape[-1]
    doc = (position_ids == 0).long().cumsum(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]
    mask = same_doc & (causal | same_span(spans))
    if valid is not None:
        mask = (mask & valid.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask[:, None]


class Decoder(nn.Module):
    """A causal LM over the joint vocabulary, returning logits and (given labels) its losses."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, *, fresh_init: bool = True):
        """fresh_init=False: the weights are about to be overwritten by a saved model's (load_bundle), so the
        structured starts (qk_gain, mimetic_qk / _vo: seconds per block at hidden 4,096) are not drawn."""
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM

        if cfg.init_from:  # the pretrained LM's shape is written into a copy: the caller's config stays as given
            cfg = replace(cfg)
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
            # the pretrained LM fixes the shape; the config says what was built (saved with the model)
            lm_cfg = self.lm.config
            cfg.hidden_size, cfg.num_layers = lm_cfg.hidden_size, lm_cfg.num_hidden_layers
            cfg.num_heads, cfg.num_kv_heads = lm_cfg.num_attention_heads, lm_cfg.num_key_value_heads
            cfg.intermediate_size, cfg.tie_embeddings = lm_cfg.intermediate_size, bool(lm_cfg.tie_word_embeddings)
            cfg.qk_norm = isinstance(self.lm, Qwen3ForCausalLM)
            cfg.rope_theta = float((getattr(lm_cfg, "rope_parameters", None) or {}).get("rope_theta")
                                   or getattr(lm_cfg, "rope_theta", cfg.rope_theta))
        else:
            hf = cfg.hf_config(vocab_size)
            self.lm = (Qwen3ForCausalLM if cfg.qk_norm else LlamaForCausalLM)(hf)
            if cfg.qk_gain != 1.0 and fresh_init:  # the gains are plain weights: a save or an export carries them
                with torch.no_grad():
                    for block in self.lm.model.layers:
                        block.self_attn.q_norm.weight.fill_(math.sqrt(cfg.qk_gain))
                        block.self_attn.k_norm.weight.fill_(math.sqrt(cfg.qk_gain))
            if cfg.mimetic_qk is not None and fresh_init:
                for block in self.lm.model.layers:
                    mimetic_qk_(block.self_attn.q_proj.weight, block.self_attn.k_proj.weight, cfg.num_heads,
                                cfg.num_kv_heads, *cfg.mimetic_qk, std=cfg.init_std)
            if cfg.mimetic_vo is not None and fresh_init:   # W_o_h W_v = M_h is q^T k = M_h with q := W_o_h^T
                alpha, beta = cfg.mimetic_vo
                for block in self.lm.model.layers:
                    mimetic_qk_(block.self_attn.o_proj.weight.T, block.self_attn.v_proj.weight, cfg.num_heads,
                                cfg.num_kv_heads, alpha, -beta, std=cfg.init_std)
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        if cfg.image_pos_embed:  # index 0: not an image code (kept at zero)
            grid = cfg.image_layout["grid"]
            self.image_rows = nn.Embedding(grid + 1, cfg.hidden_size, padding_idx=0)
            self.image_cols = nn.Embedding(grid + 1, cfg.hidden_size, padding_idx=0)
            for e in (self.image_rows, self.image_cols):
                nn.init.normal_(e.weight, std=cfg.init_std)
                e.weight.data[0].zero_()
        if hasattr(self.lm, "image_rows"):  # started from a fusion.export folder: its 2-D embeddings are ours
            rows, cols = self.lm.image_rows, self.lm.image_cols
            del self.lm.image_rows, self.lm.image_cols  # (unused inside: this module embeds, the LM gets embeddings)
            self.lm.config.image_pos_embed = False
            if cfg.image_pos_embed and rows.weight.shape == self.image_rows.weight.shape:
                self.image_rows.weight.data.copy_(rows.weight.data)
                self.image_cols.weight.data.copy_(cols.weight.data)
        export_values = None
        if hasattr(self.lm, "value_rows"):  # the export's value tables: ours below when shapes agree (its hooks
            export_values = (self.lm.value_rows, self.lm.value_cols)  # stay idle: this module passes embeddings)
            del self.lm.value_rows, self.lm.value_cols
            self.lm.config.image_pos_values = False
        if cfg.code_features:
            from torch.nn.utils import parametrize

            feats = code_feature_buffers(cfg)
            parametrize.register_parametrization(self.embed_tokens, "weight", CodeRows(cfg, feats))
            if cfg.code_head:
                parametrize.register_parametrization(self.lm.lm_head, "weight", CodeRows(cfg, feats))
        if cfg.image_pos_values:  # per block: row and column tables added to image codes' attention values
            grid, blocks = cfg.image_layout["grid"], self.lm.model.layers
            width = blocks[0].self_attn.v_proj.out_features
            self.value_rows = nn.ModuleList(nn.Embedding(grid + 1, width, padding_idx=0) for _ in blocks)
            self.value_cols = nn.ModuleList(nn.Embedding(grid + 1, width, padding_idx=0) for _ in blocks)
            for e in (*self.value_rows, *self.value_cols):
                if cfg.image_pos_values_std:
                    nn.init.normal_(e.weight, std=cfg.image_pos_values_std)
                    with torch.no_grad():
                        e.weight[0].zero_()  # index 0: not an image code
                else:
                    nn.init.zeros_(e.weight)
            if export_values is not None:  # started from an export that has them: its tables are ours
                for theirs, ours in zip(export_values, (self.value_rows, self.value_cols)):
                    if len(theirs) == len(ours) and theirs[0].weight.shape == ours[0].weight.shape:
                        ours.load_state_dict(theirs.state_dict())
            for i, block in enumerate(blocks):  # fed by the keyword `layer_cells` (Decoder.layer_cells)
                block.register_forward_pre_hook(functools.partial(_stash_value_pos, self, i), with_kwargs=True)
                block.self_attn.v_proj.register_forward_hook(_add_value_pos)
        if cfg.write_expert:  # routed by the keyword `route` (Decoder.route)
            from fusion.experts import add_write_expert

            add_write_expert(self.lm.model.layers)
        if cfg.image_pos_every_layer:  # blocks 1.. add the positions they are handed (keyword `layer_pos`)
            for i, block in enumerate(self.lm.model.layers):
                block.register_forward_pre_hook(_add_layer_pos if i else _drop_layer_pos, with_kwargs=True)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def grid_cells(self, input_ids: torch.Tensor) -> torch.Tensor:
        return grid_cells(input_ids, self.cfg.image_layout)

    def set_code_pixels(self, pixels: torch.Tensor) -> None:
        """Fill the "pixels" code features [num_codes, code_pixel_dim] (fusion.train: the decoded patches)."""
        for module in (self.embed_tokens, self.lm.lm_head):
            rows = code_rows(module)
            if rows is not None and "pixels" in rows.features:
                rows.features["pixels"].copy_(pixels.to(rows.features["pixels"]))

    @torch.no_grad()
    def plain_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embedding table, output head weight) with the code features folded into the code rows: a
        decoder without code features holding these tables computes the same function (what an export writes)."""
        return self.embed_tokens.weight.detach().clone(), self.lm.lm_head.weight.detach().clone()

    def image_pos(self, cells: torch.Tensor) -> torch.Tensor:
        """[..., T, h]: the 2-D position embedding of each token's grid cell (zero where cells are (0, 0))."""
        return self.image_rows(cells[..., 0]) + self.image_cols(cells[..., 1])

    def embed(self, input_ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: the token's (code features included, see CodeRows), plus its grid cell's when
        2-D positions are on."""
        x = self.embed_tokens(input_ids)
        if self.cfg.image_pos_embed:
            cells = self.grid_cells(input_ids) if cells is None else cells
            x = x + self.image_pos(cells)
        return x

    def layer_pos(self, input_ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor | None:
        """What blocks 1.. add to their input when `image_pos_every_layer` is on (else None): the chunk's 2-D
        position embeddings. Every forward over token ids passes it on (the sampler's runners too)."""
        if not self.cfg.image_pos_every_layer:
            return None
        return self.image_pos(self.grid_cells(input_ids) if cells is None else cells)

    def layer_cells(self, input_ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor | None:
        """The chunk's grid cells [B, T, 2] when `image_pos_values` is on (else None): each block turns them into
        its value positions (`value_pos`). Every forward over token ids passes them on, as `layer_pos`."""
        if not self.cfg.image_pos_values:
            return None
        return self.grid_cells(input_ids) if cells is None else cells

    def value_pos(self, block: int, cells: torch.Tensor) -> torch.Tensor:
        """[..., T, kv_heads x head_dim]: what block `block` adds to the attention values of these cells."""
        return self.value_rows[block](cells[..., 0]) + self.value_cols[block](cells[..., 1])

    def route(self, input_ids: torch.Tensor, read_span: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, T] bool when `write_expert` is on (else None): True on the tokens of images the model writes.
        `read_span` (fusion.sequences.pack) says which images are read; without it a chunk's complete images
        are (what a prompt's images are at inference, read_spans) and an open one at its end is written."""
        if not self.cfg.write_expert:
            return None
        from fusion.experts import write_route

        lay = self.cfg.image_layout
        if read_span is None:
            read_span = read_spans(input_ids, lay["boi"], lay["eoi"])
        return write_route(input_ids, read_span, lay)

    def block_kwargs(self, layer_pos=None, layer_cells=None, route=None) -> dict:
        """The keywords transformers hands on to every block (see layer_pos, layer_cells, route)."""
        return {k: v for k, v in (("layer_pos", layer_pos), ("layer_cells", layer_cells), ("route", route))
                if v is not None}

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0, read_span=None, layer_pos=None, layer_cells=None,
                route=None):
        """`read_span` [B, T] (fusion.sequences.pack): the read image spans, attended bidirectionally when
        `read_attention` says so; otherwise transformers' causal mask over the packed documents. `layer_pos`:
        see `layer_pos` (computed from input_ids when they are given); `route`: see `route` (likewise)."""
        if input_ids is not None and layer_pos is None:
            layer_pos = self.layer_pos(input_ids)
        if input_ids is not None and layer_cells is None:
            layer_cells = self.layer_cells(input_ids)
        if input_ids is not None and route is None:
            route = self.route(input_ids, read_span)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        inputs_embeds = self.embed_dropout(inputs_embeds)
        mask = None
        # compiled: no data-dependent branch (it would break the graph); the explicit mask of a batch without
        # read spans is transformers' packed causal one anyway
        if self.cfg.read_attention == "bidirectional" and read_span is not None and (
                torch.compiler.is_compiling() or bool(read_span.any())):
            if position_ids is None:
                position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
            mask = attention_mask(position_ids.expand(inputs_embeds.shape[0], -1), read_span)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep,
                       **self.block_kwargs(layer_pos, layer_cells, route))


def _stash_value_pos(decoder: Decoder, i: int, block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of block i (`image_pos_values`): its value positions, from the keyword `layer_cells`,
    left on its v_proj for `_add_value_pos`."""
    cells = kwargs.pop("layer_cells", None)
    block.self_attn.v_proj.value_pos = None if cells is None else decoder.value_pos(i, cells)
    return args, kwargs


def _add_value_pos(v_proj: nn.Module, args: tuple, out: torch.Tensor, attr: str = "value_pos") -> torch.Tensor:
    """Forward hook of a block's v_proj: its output plus the value positions left on it under `attr` (by
    `_stash_value_pos`; fusion.hf's exported model uses its own name), dropped once used (no tensor of this
    forward outlives it)."""
    pos = getattr(v_proj, attr, None)
    setattr(v_proj, attr, None)
    return out if pos is None else out + pos.to(out.dtype)


def _drop_layer_pos(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of block 0: its input already holds the positions (Decoder.embed)."""
    kwargs.pop("layer_pos", None)
    return args, kwargs


def _add_layer_pos(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of blocks 1..: the residual stream plus the 2-D positions (`image_pos_every_layer`),
    handed down as the keyword `layer_pos` (transformers passes extra keywords on to every block)."""
    pos = kwargs.pop("layer_pos", None)
    if pos is None:
        return args, kwargs
    if args:
        return (args[0] + pos.to(args[0].dtype), *args[1:]), kwargs
    kwargs["hidden_states"] = kwargs["hidden_states"] + pos.to(kwargs["hidden_states"].dtype)
    return args, kwargs


def fsq_digits(levels: list[int]) -> torch.Tensor:
    """[prod(levels), len(levels)]: for each FSQ code index, its level in each dimension, offset into one
    flat table of sum(levels) rows (vector-quantize-pytorch's FSQ: index = sum of level_d * prod(levels[:d]))."""
    idx = torch.arange(math.prod(levels))
    basis = torch.tensor([math.prod(levels[:d]) for d in range(len(levels))])
    digits = (idx[:, None] // basis) % torch.tensor(levels)
    offsets = torch.tensor([sum(levels[:d]) for d in range(len(levels))])
    return digits + offsets


def code_feature_buffers(cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """The fixed per-code feature vectors the config asks for; "pixels" start at zero until set_code_pixels."""
    k = cfg.image_layout["num_codes"]
    feats = {}
    if "levels" in cfg.code_features:
        onehot = torch.zeros(k, sum(cfg.code_levels))
        onehot.scatter_(1, fsq_digits(cfg.code_levels), 1.0)
        feats["levels"] = onehot
    if "pixels" in cfg.code_features:
        feats["pixels"] = torch.zeros(k, cfg.code_pixel_dim)
    return feats


class CodeRows(nn.Module):
    """A parametrisation of a [vocab, hidden] table (input embeddings or output head): its image-code rows
    become the learned rows plus learned linear projections of fixed per-code features. Each projection is
    initialised so that its output has about the table's own init scale."""

    def __init__(self, cfg: DecoderConfig, features: dict[str, torch.Tensor]):
        super().__init__()
        self.offset, self.count = cfg.image_layout["code_offset"], cfg.image_layout["num_codes"]
        self.names = list(features)
        for n, f in features.items():
            self.register_buffer(f"feature_{n}", f.clone())  # saved with the weights: fixed, not trained
        self.proj = nn.ModuleDict({n: nn.Linear(f.shape[1], cfg.hidden_size, bias=False) for n, f in features.items()})
        for n, f in features.items():
            # levels: one-hot, len(levels) ones per code; pixels: standardised, ~1 per number
            norm2 = len(cfg.code_levels) if n == "levels" else f.shape[1]
            nn.init.normal_(self.proj[n].weight, std=cfg.init_std / math.sqrt(norm2))

    @property
    def features(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"feature_{n}") for n in self.names}

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        rows = sum(self.proj[n](f.to(self.proj[n].weight.dtype)) for n, f in self.features.items())
        a, b = self.offset, self.offset + self.count
        return torch.cat([table[:a], table[a:b] + rows.to(table.dtype), table[b:]])


def code_rows(module: nn.Module) -> CodeRows | None:
    """The CodeRows parametrising `module.weight`, if any."""
    params = getattr(module, "parametrizations", None)
    return params["weight"][0] if params is not None and "weight" in params else None


@torch.no_grad()
def code_pixel_features(tokenizer, num_codes: int, batch: int = 256) -> torch.Tensor:
    """[num_codes, f * f * 3]: what each code looks like: the image tokenizer's decoder on a grid filled with the
    code, the patch at the grid's centre, standardised per number over codes (flat codes decode exactly to
    their colour; edge codes to their piece of a shape)."""
    g, f = tokenizer.cfg.grid, tokenizer.cfg.downsample
    c = g // 2
    out = []
    for chunk in torch.arange(num_codes).split(batch):
        images = tokenizer.decode(chunk.view(-1, 1, 1).expand(-1, g, g).contiguous())
        out.append(images[:, :, c * f:(c + 1) * f, c * f:(c + 1) * f].flatten(1).float())
    x = torch.cat(out)
    return (x - x.mean(0)) / (x.std(0) + 1e-3)


def lm_losses(logits: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor, z_loss: float,
              image_weight: float = 1.0, text_weight: float = 1.0, balance: str = "token") -> dict[str, torch.Tensor]:
    """Next-token losses from logits [b, t, V]; labels [b, t] hold the target of each position
    (-100 = no loss); modality [b, t] is 0 for text targets, 1 for image targets.

    balance "token": every target token counts once, times its modality's weight (the total is a per-token
    loss when both weights are 1), so ~40 image codes per picture outweigh a one-token answer.
    balance "modality": text and image cross-entropies are averaged separately, then mixed by the weights
    (DALL-E's 1 : 7 text : image), so the answers' share of the gradient no longer depends on how many
    image tokens a batch holds.
    Returns the weighted total, the text and image cross-entropies (per token) and the z-loss.
    """
    logits = logits.float()
    mask = labels != -100
    # one logsumexp over the vocabulary serves the cross-entropy and the z-loss; the target logit is picked by
    # comparison, not gathered: a gather's backward is a scatter-add, which torch's deterministic mode (the CPU
    # trainer's) runs slowly; inside the compiled step this is one fused pass over the logits
    lse = torch.logsumexp(logits, dim=-1)
    vocab_ids = torch.arange(logits.shape[-1], device=logits.device)
    target = torch.where(vocab_ids == labels.unsqueeze(-1), logits, 0.0).sum(-1)
    ce = torch.where(mask, lse - target, 0.0)
    is_image = (modality == 1) & mask
    is_text = mask & ~is_image
    n_img, n_txt = is_image.sum(), is_text.sum()
    image_sum, text_sum = (ce * is_image).sum(), (ce * is_text).sum()
    image_ce, text_ce = image_sum / n_img.clamp_min(1), text_sum / n_txt.clamp_min(1)
    zl = z_loss * torch.where(mask, lse ** 2, 0.0).sum() / mask.sum().clamp_min(1) if z_loss else lse.new_zeros(())
    if balance == "modality":
        wi, wt = image_weight * (n_img > 0), text_weight * (n_txt > 0)
        total = (wi * image_ce + wt * text_ce) / (wi + wt).clamp_min(1e-9)
    elif balance == "token":
        total = (image_weight * image_sum + text_weight * text_sum) / mask.sum().clamp_min(1)
    else:
        raise ValueError(f"loss balance must be token or modality, got {balance!r}")
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


@torch.no_grad()
def mimetic_qk_(wq: torch.Tensor, wk: torch.Tensor, heads: int, kv_heads: int, alpha: float, beta: float,
                std: float) -> None:
    """Start each head's queries and keys so that W_q_h^T W_k_h is the best rank-head_dim match of
    alpha * Z_h + beta * I (Trockman & Kolter 2023): a token's query then points at keys of tokens like itself.
    A key head shared by several query heads (GQA) takes its rows from the SVD of its first query head's target;
    every query head h then takes M_h's part in that key space (q_h^T = M_h k^+), so each keeps its own Z_h.
    Each matrix is rescaled to entries of RMS `std` (the plain init's), so the optimiser sees the same scale.
    Exact SVDs in float64 up to hidden 512 (the CPU presets, milliseconds); above, torch.svd_lowrank in float32
    on the weights' device (seconds per block on a CPU at 4,096). Nothing to fill on the meta device.
    mimetic_vo uses the same fill with wq := W_o^T (a view: written through) and beta < 0."""
    if wq.is_meta:
        return
    hidden, dh, group = wq.shape[1], wq.shape[0] // heads, heads // kv_heads
    exact = hidden <= 512
    kw = dict(dtype=torch.float64 if exact else torch.float32, device=wq.device)
    eye = torch.eye(hidden, **kw)

    def target():
        return alpha * torch.randn(hidden, hidden, **kw) / math.sqrt(hidden) + beta * eye

    def scaled(w):
        return (w * std / w.pow(2).mean().sqrt()).to(wq.dtype)

    for g in range(kv_heads):
        first = target()
        if not alpha:  # every subspace fits I equally and an SVD picks the same axes for every head: a random basis
            rot, _ = torch.linalg.qr(torch.randn(hidden, hidden, **kw))
            _, s, vh = torch.linalg.svd(rot.T @ first @ rot)
            vh = vh @ rot.T
        elif exact:
            _, s, vh = torch.linalg.svd(first)
        else:
            _, s, v = torch.svd_lowrank(first, q=dh + 16, niter=2)
            vh = v.T
        k = s[:dh].sqrt()[:, None] * vh[:dh]                    # [dh, hidden]
        k_pinv = vh[:dh].T / s[:dh].sqrt()                       # [hidden, dh]
        wk[g * dh:(g + 1) * dh] = scaled(k)
        for h in range(g * group, (g + 1) * group):
            q = ((first if h == g * group else target()) @ k_pinv).T   # q^T k = M_h on the keys' subspace
            wq[h * dh:(h + 1) * dh] = scaled(q)


# What init_donor can take from another seed's initial weights: parameter-name patterns of the decoder's parts
# (norm gains start at the same constants in every seed, so they belong to no part).
INIT_PARTS = {
    "embeddings": r"embed_tokens|lm_head|image_rows|image_cols",   # input and output token rows, 2-D positions
    "qk": r"self_attn\.(q_proj|k_proj)\.",                         # where each head looks
    "vo": r"self_attn\.(v_proj|o_proj)\.|value_rows|value_cols",   # what each head returns
    "mlp": r"\.mlp\.",
}


@torch.no_grad()
def take_init(decoder: Decoder, donor: Decoder, parts: list[str], blocks: list[int] | None = None) -> list[str]:
    """Copy the named parts (INIT_PARTS) of `donor`'s weights into `decoder`, the rest stays: which part of an
    initialisation decides whether a run turns (README screen 18). `blocks` (0-based) keeps a block's weights to
    those blocks (weights outside the blocks, the embeddings, are not limited). Returns the copied names."""
    unknown = [p for p in parts if p not in INIT_PARTS]
    if unknown or not parts:
        raise UserError(f"init_donor.parts must name some of {sorted(INIT_PARTS)}, got {list(parts)}")
    n_blocks = len(decoder.lm.model.layers)
    if blocks is not None and (not blocks or any(not 0 <= b < n_blocks for b in blocks)):
        raise UserError(f"init_donor.blocks must name some of the blocks 0..{n_blocks - 1}, got {list(blocks)}")
    pattern = re.compile("|".join(INIT_PARTS[p] for p in parts))
    in_block = re.compile(r"(?:layers|value_rows|value_cols)\.(\d+)\.")
    mine, taken = dict(decoder.named_parameters()), []
    for name, p in donor.named_parameters():
        block = in_block.search(name)
        if pattern.search(name) and (blocks is None or block is None or int(block.group(1)) in blocks):
            if name not in mine or mine[name].shape != p.shape:
                raise UserError(f"init_donor: the donor's {name} {tuple(p.shape)} has no match in this decoder")
            mine[name].copy_(p)
            taken.append(name)
    return taken
