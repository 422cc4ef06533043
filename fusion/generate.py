"""Batched generation over the joint vocabulary with a per-row state machine.

A row is in text mode or inside an image span. In text mode image codes cannot appear (and <boi>
only where images are allowed); inside a span the layout decides every position: a code, <eol>
at each row end, <eoi> after the last row, so every image has exactly H x W codes. Classifier-free
guidance mixes the logits of an unconditional stream (the prompt replaced by an empty one, as in
training's condition dropout) at image-code positions. A KV cache is used unless switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from fusion.vocab import MultimodalVocab

TEXT, CODE, EOL, EOI, DONE = range(5)


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0  # > 1: classifier-free guidance inside image spans
    max_new_tokens: int = 256
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
        self.newline = torch.tensor([("\n" in v.decode_text([i])) for i in range(v.text_size)] + [False] * (V - v.text_size))

    def _device(self):
        return next(self.decoder.parameters()).device

    @torch.no_grad()
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
        state = torch.full((B,), TEXT, dtype=torch.long)
        span_pos = torch.zeros(B, dtype=torch.long)  # tokens emitted since <boi>
        n_images = torch.zeros(B, dtype=torch.long)
        # rows whose prompt already opened an image span (a text-to-image prompt ends in <boi>)
        for r, p in enumerate(prompts):
            if p[-1] == self.vocab.boi:
                state[r] = self._kind(span_pos[r])
        out = [[] for _ in range(B)]
        cache = DynamicCache() if sc.use_cache else None
        step_ids, full_ids, full_attn = ids, ids, attn
        prefix_embeds = self._prefix_embeds(ids, images) if images else None  # adapter: features at placeholders
        for step in range(sc.max_new_tokens):
            if (state == DONE).all():
                break
            pos = (full_attn.cumsum(-1) - 1).clamp_min(0)
            if sc.use_cache:
                inputs = {"inputs_embeds": prefix_embeds} if step == 0 and prefix_embeds is not None else {"input_ids": step_ids}
                logits = self.decoder.lm(**inputs, attention_mask=full_attn, position_ids=pos[:, -step_ids.shape[1]:],
                                         past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            else:
                inputs = {"input_ids": full_ids}
                if prefix_embeds is not None:
                    new = self.decoder.embed_tokens(full_ids[:, prefix_embeds.shape[1]:])
                    inputs = {"inputs_embeds": torch.cat([prefix_embeds, new], dim=1)}
                logits = self.decoder.lm(**inputs, attention_mask=full_attn, position_ids=pos,
                                         use_cache=False, logits_to_keep=1).logits[:, -1]
            logits = logits.float().cpu()
            cond = logits[:B]
            if guided:
                uncond = logits[B:]
                mix = (state == CODE).unsqueeze(1)
                cond = torch.where(mix, uncond + sc.cfg_scale * (cond - uncond), cond)
            allowed = self.masks[state].clone()
            if not sc.allow_images:
                allowed[:, self.vocab.boi] = False
            cond = cond.masked_fill(~allowed, float("-inf"))
            if sc.temperature <= 0:
                nxt = cond.argmax(-1)
            else:
                probs = torch.softmax(warpers(None, cond), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for r in range(B):
                if state[r] != DONE:
                    out[r].append(int(nxt[r]))
            state, span_pos, n_images = self._advance(state, span_pos, n_images, nxt, sc)
            step = nxt.to(dev).unsqueeze(1)
            if guided:
                step = torch.cat([step, step])
            full_attn = torch.cat([full_attn, torch.ones_like(step)], dim=1)
            full_ids = torch.cat([full_ids, step], dim=1)
            step_ids = step
        return out

    def _prefix_embeds(self, ids: torch.Tensor, images: list[list[torch.Tensor]]) -> torch.Tensor:
        from fusion.adapter import insert_image_features

        if self.image_encoder is None:
            raise ValueError("prompts with images need the adapter's image encoder")
        embeds = self.decoder.embed_tokens(ids)
        flat = [im for per_prompt in images for im in per_prompt]
        feats = self.image_encoder(torch.stack(flat).to(ids.device).float() / 255)
        return insert_image_features(embeds, ids, self.vocab.placeholder, feats)

    def _kind(self, span_pos: torch.Tensor) -> int:
        kind = self.vocab.layout.kind_at(int(span_pos) + 1)
        return {"code": CODE, "eol": EOL, "eoi": EOI}[kind]

    def _advance(self, state, span_pos, images, nxt, sc: SamplingConfig):
        v = self.vocab
        state, span_pos, images = state.clone(), span_pos.clone(), images.clone()
        for r in range(len(state)):
            t = int(nxt[r])
            if state[r] == DONE:
                continue
            if state[r] == TEXT:
                if t == v.eos or (sc.stop_at_newline and bool(self.newline[t])):
                    state[r] = DONE
                elif t == v.boi:
                    span_pos[r] = 0
                    state[r] = self._kind(span_pos[r])
                continue
            span_pos[r] += 1
            if t == v.eoi:
                images[r] += 1
                state[r] = DONE if sc.max_images and images[r] >= sc.max_images else TEXT
            else:
                state[r] = self._kind(span_pos[r])
        return state, span_pos, images


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
