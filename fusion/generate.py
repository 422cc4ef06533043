"""Batched generation over the joint vocabulary with a per-row state machine.

A row is in text mode or inside an image span. In text mode image codes cannot appear (and <boi>
only where images are allowed); inside a span the layout decides every position: a code, <eol>
at each row end, <eoi> after the last row, so every image has exactly H x W codes. Classifier-free
guidance mixes the logits of an unconditional stream (the prompt replaced by an empty one, as in
training's condition dropout) at image-code positions. A KV cache is used unless switched off: the lean
static one of fusion/kvcache.py for Llama / Qwen3 decoders, transformers' DynamicCache for others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from fusion import kvcache
from fusion.decoder import attention_mask, read_spans
from fusion.vocab import MultimodalVocab

TEXT, CODE, EOL, EOI, DONE = range(5)


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0  # > 1: classifier-free guidance inside image spans
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # no <eos> before this many tokens (transformers' min_new_tokens): a caption after an
                             # image, where an unconditional text-to-image document would end
    allow_images: bool = True  # may text mode open an image span
    stop_at_newline: bool = False  # end a row at the first newline (VQA answers)
    max_images: int = 1  # close the row after this many images (0 = no limit)
    use_cache: bool = True


class Generator:
    def __init__(self, decoder, vocab: MultimodalVocab, image_encoder=None):
        self.decoder, self.vocab, self.image_encoder = decoder, vocab, image_encoder
        V, v = vocab.size, vocab
        masks = torch.zeros(5, V, dtype=torch.bool)
        masks[TEXT, : v.text_size] = True
        masks[TEXT, v.eos] = True
        masks[TEXT, v.boi] = True  # text may open an image span (unless sc.allow_images is off)
        masks[CODE, v.code_offset:] = True
        masks[EOL, v.eol] = True
        masks[EOI, v.eoi] = True
        masks[DONE, v.pad] = True
        masks[TEXT, v.placeholder] = False
        self.masks = masks
        self.newline = {i for i in range(v.text_size) if "\n" in v.decode_text([i])}  # ids that end a VQA answer

    def _device(self):
        return next(self.decoder.parameters()).device

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sc: SamplingConfig, seed: int = 0,
                 uncond_prompts: list[list[int]] | None = None,
                 images: list[list[torch.Tensor]] | None = None) -> list[list[int]]:
        """Token ids after each prompt (prompts are full id lists, starting with <bos>).

        `images` (the adapter baseline): per prompt, the pixels of its placeholder spans, in order.
        """
        dev = self._device()
        B = len(prompts)
        guided = sc.cfg_scale != 1.0
        if guided and uncond_prompts is None:  # the empty prompt of condition dropout, then the same span
            uncond_prompts = [[self.vocab.bos] + ([self.vocab.boi] if p[-1] == self.vocab.boi else []) for p in prompts]
        streams = prompts + (uncond_prompts if guided else [])
        ids, attn = _left_pad(streams, self.vocab.pad, dev)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        warpers = _warpers(sc)
        # per row: its mode, tokens emitted since <boi>, images finished; a text-to-image prompt ends
        # in <boi>, so its row starts inside the span
        state = [self._kind(0) if p[-1] == self.vocab.boi else TEXT for p in prompts]
        span_pos, n_images = [0] * B, [0] * B
        out = [[] for _ in range(B)]
        # the prompt's input embeddings (the adapter's carry image features at the placeholders)
        embeds = self._prefix_embeds(ids, images) if images else self.decoder.embed(ids)
        layer_pos = self.decoder.layer_pos(ids)  # decoder.image_pos_every_layer (None when off)
        layer_cells = self.decoder.layer_cells(ids)  # decoder.image_pos_values (None when off)
        route = self.decoder.route(ids)  # decoder.write_expert: a prompt ending in <boi> writes that image
        step_attn = attn
        # a prompt's complete images are read: attended bidirectionally when the decoder was trained so
        spans = (read_spans(ids, self.vocab.boi, self.vocab.eoi)
                 if self.decoder.cfg.read_attention == "bidirectional" else None)
        if sc.use_cache and kvcache.supported(self.decoder.lm):  # the lean path (fusion/kvcache.py)
            runner = kvcache.StaticKVCache(self.decoder.lm, len(streams), ids.shape[1] + sc.max_new_tokens,
                                           self.decoder.value_pos if self.decoder.cfg.image_pos_values else None)
        else:  # transformers' forward, with its DynamicCache or recomputing everything (the reference)
            runner = TransformersRunner(self.decoder, sc.use_cache)
        for step in range(sc.max_new_tokens):
            if all(st == DONE for st in state):
                break
            logits = runner.forward(step_attn, embeds, spans if step == 0 else None, layer_pos, layer_cells, route)
            logits = logits.float().cpu()
            cond = logits[:B]
            rows = torch.tensor(state)
            if guided:
                uncond = logits[B:]
                mix = (rows == CODE).unsqueeze(1)
                cond = torch.where(mix, uncond + sc.cfg_scale * (cond - uncond), cond)
            allowed = self.masks[rows]
            if not sc.allow_images:
                allowed[:, self.vocab.boi] = False
            if step < sc.min_new_tokens:
                allowed[:, self.vocab.eos] = False
            cond = cond.masked_fill(~allowed, float("-inf"))
            if sc.temperature <= 0:
                nxt = cond.argmax(-1)
            else:
                probs = torch.softmax(warpers(None, cond), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            cells = [(0, 0)] * B  # where each new token sits in its image (2-D position embeddings)
            for r, t in enumerate(nxt.tolist()):
                if state[r] != DONE:
                    out[r].append(t)
                    was_code = state[r] == CODE
                    self._advance(r, t, state, span_pos, n_images, sc)
                    if was_code:
                        cells[r] = self.vocab.layout.cell(span_pos[r])
            step_ids, cells = nxt.to(dev).unsqueeze(1), torch.tensor(cells, device=dev).unsqueeze(1)
            if guided:
                step_ids, cells = torch.cat([step_ids, step_ids]), torch.cat([cells, cells])
            embeds, layer_pos = self.decoder.embed(step_ids, cells), self.decoder.layer_pos(step_ids, cells)
            layer_cells = self.decoder.layer_cells(step_ids, cells)
            route = None if route is None else self.decoder.route(step_ids, torch.zeros_like(step_ids))  # written
            step_attn = torch.ones_like(step_ids)
        return out

    def _prefix_embeds(self, ids: torch.Tensor, images: list[list[torch.Tensor]]) -> torch.Tensor:
        from fusion.adapter import insert_image_features

        if self.image_encoder is None:
            raise ValueError("prompts with images need the adapter's image encoder")
        embeds = self.decoder.embed_tokens(ids)
        flat = [im for per_prompt in images for im in per_prompt]
        feats = self.image_encoder(torch.stack(flat).to(ids.device).float() / 255)
        return insert_image_features(embeds, ids, self.vocab.placeholder, feats)

    def _kind(self, span_pos: int) -> int:
        """The mode after `span_pos` tokens of an image span: what the layout puts next."""
        return {"code": CODE, "eol": EOL, "eoi": EOI}[self.vocab.layout.kind_at(span_pos + 1)]

    def _advance(self, r: int, t: int, state: list, span_pos: list, images: list, sc: SamplingConfig) -> None:
        """Row r just emitted token t: move its state machine on (in place)."""
        v = self.vocab
        if state[r] == TEXT:
            if t == v.eos or (sc.stop_at_newline and t in self.newline):
                state[r] = DONE
            elif t == v.boi:
                span_pos[r] = 0
                state[r] = self._kind(0)
            return
        span_pos[r] += 1
        if t == v.eoi:
            images[r] += 1
            state[r] = DONE if sc.max_images and images[r] >= sc.max_images else TEXT
        else:
            state[r] = self._kind(span_pos[r])


class TransformersRunner:
    """transformers' own forward, with its DynamicCache or (use_cache off) recomputing the whole sequence
    at every step: the reference the lean cache is tested against, and the path for other architectures."""

    def __init__(self, decoder, use_cache: bool):
        self.decoder, self.lm, self.cache = decoder, decoder.lm, DynamicCache() if use_cache else None
        self.embeds = self.attn = self.spans = self.layer_pos = self.layer_cells = self.route = None

    def forward(self, attn: torch.Tensor, inputs_embeds: torch.Tensor, spans: torch.Tensor | None = None,
                layer_pos: torch.Tensor | None = None, layer_cells: torch.Tensor | None = None,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """Append a chunk (attn [B, T], its input embeddings [B, T, h]; `spans` [B, T]: read image spans of
        the first chunk, see fusion.decoder.read_spans; `layer_pos` [B, T, h], `layer_cells` [B, T, 2] and
        `route` [B, T]: Decoder.layer_pos, Decoder.layer_cells and Decoder.route, or None); the last column's
        logits [B, V]."""
        self.attn = attn if self.attn is None else torch.cat([self.attn, attn], dim=1)
        if spans is not None:
            self.spans = spans
        elif self.spans is not None:  # tokens after the prompt are in no read span
            self.spans = torch.cat([self.spans, torch.zeros_like(attn)], dim=1)
        pos = (self.attn.cumsum(-1) - 1).clamp_min(0)
        mask = self.attn
        if self.spans is not None and (spans is not None or self.cache is None):
            mask = attention_mask(pos, self.spans, valid=self.attn)
        if self.cache is not None:
            return self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos[:, -attn.shape[1]:],
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                           **self.decoder.block_kwargs(layer_pos, layer_cells, route)).logits[:, -1]
        self.embeds = inputs_embeds if self.embeds is None else torch.cat([self.embeds, inputs_embeds], dim=1)
        if layer_pos is not None:
            self.layer_pos = layer_pos if self.layer_pos is None else torch.cat([self.layer_pos, layer_pos], dim=1)
        if layer_cells is not None:
            self.layer_cells = (layer_cells if self.layer_cells is None
                                else torch.cat([self.layer_cells, layer_cells], dim=1))
        if route is not None:
            self.route = route if self.route is None else torch.cat([self.route, route], dim=1)
        return self.lm(inputs_embeds=self.embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=1,
                       **self.decoder.block_kwargs(self.layer_pos, self.layer_cells, self.route)).logits[:, -1]


def _warpers(sc: SamplingConfig) -> LogitsProcessorList:
    w = LogitsProcessorList()
    if sc.temperature > 0 and sc.temperature != 1.0:
        w.append(TemperatureLogitsWarper(sc.temperature))
    if sc.top_k > 0:
        w.append(TopKLogitsWarper(sc.top_k))
    if sc.top_p < 1.0:
        w.append(TopPLogitsWarper(sc.top_p))
    return w


def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        attn[i, n - len(s):] = 1
    return ids.to(device), attn.to(device)
