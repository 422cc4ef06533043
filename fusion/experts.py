"""A writing expert: the image codes the model writes run through their own copy of every block's weights.

Mixture-of-Transformers by role (BAGEL's understanding / generation experts, MoT's per-modality weights; Janus
decouples the two directions' encoders for the same reason): text and the images the model *reads* use the
block weights as before, the codes of an image it *writes* (and that image's <boi>) use a second copy of each
block's norms, attention projections and MLP, and every token still attends to every earlier one in one
sequence. Each token passes through one set of weights, so a token costs the FLOPs it did; the blocks hold twice
the parameters. Early fusion is kept: one vocabulary, one sequence, one attention.

Why: in one set of weights the two directions fight for the same updates (README, study screens 3 and 10-11):
weighting answers up buys reading and costs writing, VQA documents alone learn "Where" (position 93 %) while the
mix never does, and whichever direction trains first blocks the other.

The route of each token is handed to the blocks as the keyword `route` ([B, T] bool, True = written), which a
pre-hook turns into index lists on the block's routed modules (as Decoder's `layer_cells`).
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

ROUTED = ("input_layernorm", "post_attention_layernorm", "mlp")
ROUTED_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class Routed(nn.Module):
    """A module and its writing copy: each token of a [B, T, ...] input goes through the one its route names."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.write = base, copy.deepcopy(base)
        self.plan = None  # (tokens, base indices, write indices) for this forward, set by the block's pre-hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return self.base(x)
        n, base_idx, write_idx = self.plan
        if not len(write_idx):
            return self.base(x)
        if not len(base_idx):
            return self.write(x)
        lead, flat = x.shape[:2], x.reshape(n, *x.shape[2:])
        # index_select / index_copy: their backward (index_add / index_select) beats advanced indexing's
        # accumulating index_put on CPU (~5 % of the expert's training step in a same-run A/B)
        y_base, y_write = self.base(flat.index_select(0, base_idx)), self.write(flat.index_select(0, write_idx))
        out = y_base.new_zeros((n, *y_base.shape[1:])).index_copy(0, base_idx, y_base).index_copy(0, write_idx, y_write)
        return out.view(*lead, *y_base.shape[1:])


def add_write_expert(blocks: nn.ModuleList) -> None:
    """Give every block a writing copy of its norms, attention projections and MLP (started equal)."""
    for block in blocks:
        for name in ROUTED:
            setattr(block, name, Routed(getattr(block, name)))
        for name in ROUTED_ATTENTION:
            if hasattr(block.self_attn, name):
                setattr(block.self_attn, name, Routed(getattr(block.self_attn, name)))
        routed = [m for m in block.modules() if isinstance(m, Routed)]  # found once, not in every forward
        block.register_forward_pre_hook(functools.partial(_plan_routes, routed), with_kwargs=True)
        block.register_forward_hook(functools.partial(_drop_plans, routed))


@torch.no_grad()
def fork_write_expert(module: nn.Module) -> list[nn.Parameter]:
    """Make every writing copy equal to its shared weights again (BAGEL starts its generation expert from the
    understanding model's weights): a model that learned to read first starts writing from what it knows, not from
    its initialisation. Returns the copies' parameters (the caller drops their optimizer state)."""
    forked = []
    for m in module.modules():
        if isinstance(m, Routed):
            for w, b in zip(m.write.parameters(), m.base.parameters(), strict=True):
                w.copy_(b)
                forked.append(w)
    return forked


def has_write_expert(module: nn.Module) -> bool:
    return any(isinstance(m, Routed) for m in module.modules())


def write_route(input_ids: torch.Tensor, read_span: torch.Tensor, layout: dict) -> torch.Tensor:
    """[B, T] bool: the tokens of images the model writes - image codes and <boi> outside every read span."""
    lo = layout["code_offset"]
    image = ((input_ids >= lo) & (input_ids < lo + layout["num_codes"])) | (input_ids == layout["boi"])
    return image & (read_span == 0)


def _plan_routes(routed: list[Routed], block: nn.Module, args: tuple, kwargs: dict):
    route = kwargs.pop("route", None)
    plan = None
    if route is not None:
        flat = route.reshape(-1).bool()
        plan = (flat.numel(), (~flat).nonzero()[:, 0], flat.nonzero()[:, 0])
    for m in routed:
        m.plan = plan
    return args, kwargs


def _drop_plans(routed: list[Routed], block: nn.Module, args: tuple, out):
    for m in routed:
        m.plan = None
