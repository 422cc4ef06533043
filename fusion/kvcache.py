"""A lean cached forward for sampling: the decoder's own weights, a preallocated KV cache, few ops a token.

At the demo size transformers' forward costs ~4.5 ms per generated token on this CPU, nearly all of it
per-call overhead (mask building, cache bookkeeping, ~40 small ops per layer) around ~10 MFLOP of
arithmetic. This runs the same Llama / Qwen3 block -- RMSNorm, fused QKV, QK-norm when the model has it,
RoPE from the model's own rotary table, SDPA, SwiGLU -- on a fixed-size cache written in place, as
gpt-fast and litgpt do. It reads the weights of the live model (nothing is copied but the fused QKV,
gate/up and stacked QK-norm weights) and is checked against transformers' full forward in tests/fusion/test_generate.py.
Other architectures (a pretrained `init_from` of another family) fall back to transformers' DynamicCache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.decoder import same_span

SUPPORTED = ("LlamaForCausalLM", "Qwen3ForCausalLM")


def supported(lm) -> bool:
    from fusion.experts import has_write_expert

    cfg = lm.config
    return (type(lm).__name__ in SUPPORTED and not has_write_expert(lm) and not getattr(cfg, "use_sliding_window", False)
            and getattr(cfg, "hidden_act", "silu") == "silu" and not getattr(cfg, "mlp_bias", False))


def _cat_bias(*linears):
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears])


class StaticKVCache:
    """Runs `lm` (a LlamaForCausalLM or Qwen3ForCausalLM) over left-padded rows, one chunk at a time.

    Slot t of the cache holds column t of the padded sequence; a row's position ids count only its real
    tokens, so a left-padded row sees exactly what it would see alone.
    """

    def __init__(self, lm, batch: int, max_len: int, value_pos=None):
        """`value_pos(block, cells)`: what each block adds to image codes' values (Decoder.value_pos), or None."""
        m, cfg = lm.model, lm.config
        self.value_pos = value_pos
        p = next(lm.parameters())
        self.lm, self.max_len = lm, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        D, H, KV = self.head_dim, self.heads, self.kv_heads
        self.blocks = []
        with torch.no_grad():
            for layer in m.layers:
                a, mlp = layer.self_attn, layer.mlp
                qk_norm = getattr(a, "q_norm", None) is not None  # Qwen3: one RMSNorm weight per head dim
                self.blocks.append(dict(
                    ln1=_norm_args(layer.input_layernorm), ln2=_norm_args(layer.post_attention_layernorm),
                    qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    qkv_bias=_cat_bias(a.q_proj, a.k_proj, a.v_proj), o=(a.o_proj.weight, a.o_proj.bias),
                    scaling=a.scaling,
                    qk_norm=(torch.cat([a.q_norm.weight.expand(H, D), a.k_norm.weight.expand(KV, D)]),
                             a.q_norm.variance_epsilon) if qk_norm else None,
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight))
            cos, sin = m.rotary_emb(p.new_zeros(1), torch.arange(max_len, device=p.device)[None])
            self.final_norm = _norm_args(m.norm)
        self.cos, self.sin = cos[0].to(p.dtype), sin[0].to(p.dtype)  # [max_len, head_dim]
        # rotate_half(x) = x @ rot: RoPE as two multiplies and one tiny matmul
        half = D // 2
        self.rot = p.new_zeros(D, D)
        self.rot[half:, :half] = -torch.eye(half, dtype=p.dtype, device=p.device)
        self.rot[:half, half:] = torch.eye(half, dtype=p.dtype, device=p.device)
        shape = (len(self.blocks), batch, self.kv_heads, max_len, self.head_dim)
        self.k, self.v = p.new_zeros(shape), p.new_zeros(shape)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)
        self.seen = torch.zeros(batch, 1, dtype=torch.long, device=p.device)  # real tokens per row so far
        self.len, self.padded = 0, True

    @torch.inference_mode()
    def forward(self, attn: torch.Tensor, inputs_embeds: torch.Tensor, spans: torch.Tensor | None = None,
                layer_pos: torch.Tensor | None = None, layer_cells: torch.Tensor | None = None,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """Append a chunk (attn [B, T]: 1 = real token, 0 = left padding; its input embeddings [B, T, h];
        `spans` [B, T]: the chunk's read image spans, attended bidirectionally, fusion.decoder.read_spans;
        `layer_pos` [B, T, h]: added before every block but the first, Decoder.layer_pos; `layer_cells` [B, T, 2]:
        the cells whose value positions each block adds, Decoder.layer_cells; `route`: a writing expert's, which
        this cache does not run - `supported` sends such decoders to transformers); return the last column's
        logits [B, V]."""
        if route is not None:
            raise ValueError("the lean cache has no writing expert (kvcache.supported is False for such a decoder)")
        x = inputs_embeds
        B, T, _ = x.shape
        t0, t1 = self.len, self.len + T
        if t1 > self.max_len:
            raise ValueError(f"sequence of {t1} tokens is longer than the cache ({self.max_len})")
        attn = attn.bool()
        self.valid[:, t0:t1] = attn
        if t0 == 0:
            self.padded = not bool(attn.all())  # no padding: attention needs no mask after the prefill
        counts = attn.long().cumsum(-1)
        pos = (self.seen + counts - 1).clamp_min(0)
        self.seen += counts[:, -1:]
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # [B, T, 1, D]
        if T == 1:  # one new token per row, after everything cached
            mask = self.valid[:, None, None, :t1] if self.padded else None
        else:  # causal over the new chunk; a padding query sees itself, so no row of the softmax is empty
            col = torch.arange(t1, device=x.device)
            row = torch.arange(t0, t1, device=x.device)[:, None]
            mask = (self.valid[:, None, None, :t1] & (col <= row)) | (col == row)
            if spans is not None:  # the prompt's read images: every pair inside one span
                if t0:
                    raise ValueError("read image spans are given with the first chunk (the prompt) only")
                mask = mask | same_span(spans)[:, None]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        for i, b in enumerate(self.blocks):
            if i and layer_pos is not None:
                x = x + layer_pos.to(x.dtype)
            qkv = F.linear(F.rms_norm(x, *b["ln1"]), b["qkv"], b["qkv_bias"]).view(B, T, H + 2 * KV, D)
            qk, v = qkv[:, :, :H + KV], qkv[:, :, H + KV:]
            if layer_cells is not None and self.value_pos is not None:
                v = v + self.value_pos(i, layer_cells).to(v.dtype).view(B, T, KV, D)
            if b["qk_norm"] is not None:
                weight, eps = b["qk_norm"]
                qk = F.rms_norm(qk, (D,), None, eps) * weight
            qk = torch.addcmul(qk * cos, qk @ self.rot, sin).transpose(1, 2)  # RoPE on queries and keys at once
            q, k = qk[:, :H], qk[:, H:]
            self.k[i, :, :, t0:t1], self.v[i, :, :, t0:t1] = k, v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, self.k[i, :, :, :t1], self.v[i, :, :, :t1], attn_mask=mask,
                                               scale=b["scaling"], enable_gqa=KV != H)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, H * D), *b["o"])
            gate, up = F.linear(F.rms_norm(x, *b["ln2"]), b["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, b["down"])
        self.len = t1
        return self.lm.lm_head(F.rms_norm(x[:, -1], *self.final_norm))


def _norm_args(norm) -> tuple:
    """(normalized_shape, weight, eps) of a Llama / Qwen3 RMSNorm, for F.rms_norm."""
    return (norm.weight.shape, norm.weight, norm.variance_epsilon)
