"""A trained early-fusion model as a transformers folder:

    python -m fusion.export model_dir=runs/demo/decoder/model out=runs/export

writes config.json + model.safetensors (model type "vqfusion", see fusion/hf.py), generation_config.json,
the tokenizer files (the text BPE with the specials and one added token per image code, so the ids are the
training ids), image_tokenizer/ (to turn codes into pixels) and a model card (README.md). After
`import fusion`, `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load it,
and its logits equal the project's decoder on the same ids.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data.runtime import UserError, cli
from fusion.checkpoint import load_bundle
from fusion.hf import VQFusionConfig, VQFusionForCausalLM
from fusion.vocab import SPECIALS, MultimodalVocab

def code_token(i: int) -> str:
    return f"<code_{i}>"


def hf_tokenizer(vocab: MultimodalVocab):
    """The text tokenizer with the specials and the image codes appended as added tokens, in the vocabulary's
    order, so every id means what it meant in training."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(vocab.text_tokenizer)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS], special_tokens=True)
    tok.add_tokens([AddedToken(code_token(i), special=True, normalized=False) for i in range(vocab.num_codes)],
                   special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = "<bos>", "<eos>", "<pad>"
    ids = tok.convert_tokens_to_ids([*SPECIALS, code_token(0), code_token(vocab.num_codes - 1)])
    want = [vocab.special[s] for s in SPECIALS] + [vocab.code_offset, vocab.size - 1]
    if ids != want or len(tok) != vocab.size:
        raise UserError(f"the exported tokenizer's ids {ids} (size {len(tok)}) do not match the vocabulary's "
                        f"{want} (size {vocab.size}): the text tokenizer already holds some of {list(SPECIALS)}?")
    return tok


def export(model_dir: str | Path, out: str | Path) -> Path:
    from transformers import GenerationConfig

    bundle = load_bundle(model_dir)
    dec, vocab, out = bundle.decoder, bundle.vocab, Path(out)
    if bundle.arm != "fusion":
        raise UserError(f"{model_dir} is an adapter-baseline model: only early-fusion models export (its image "
                        "features come from a vision tower a causal LM folder cannot hold)")
    if not dec.cfg.qk_norm:
        raise UserError("export writes the QK-norm (Qwen3) decoder; this one was trained with decoder.qk_norm=false")
    if dec.cfg.image_pos_every_layer:
        raise UserError("export writes 2-D positions at the input only; this decoder adds them before every block "
                        "(decoder.image_pos_every_layer=true)")
    if dec.cfg.write_expert:
        raise UserError("export writes one set of block weights; this decoder writes images with a second "
                        "(decoder.write_expert=true)")
    base = dec.cfg.hf_config(vocab.size).to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_attn_implementation_autoset",
              "bos_token_id", "eos_token_id", "pad_token_id"):
        base.pop(k, None)
    layout = {**vocab.image_layout(), "eoi": vocab.eoi, "eol": vocab.eol}
    cfg = VQFusionConfig(image_layout=layout, image_pos_embed=dec.cfg.image_pos_embed, read_attention=dec.cfg.read_attention,
                         image_pos_values=dec.cfg.image_pos_values,
                         bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad, **base)
    cfg.architectures = [VQFusionForCausalLM.__name__]
    model = VQFusionForCausalLM(cfg)
    state = {k: v for k, v in dec.lm.state_dict().items() if ".parametrizations." not in k}
    state["model.embed_tokens.weight"], state["lm_head.weight"] = dec.plain_tables()  # code features folded in
    if dec.cfg.image_pos_embed:
        state["image_rows.weight"], state["image_cols.weight"] = dec.image_rows.weight, dec.image_cols.weight
    if dec.cfg.image_pos_values:
        for name in ("value_rows", "value_cols"):
            state.update({f"{name}.{i}.weight": e.weight for i, e in enumerate(getattr(dec, name))})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"export: weights that do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tokenizer(vocab).save_pretrained(out)
    # the project's sampling defaults (conf/evaluate_fusion.yaml: T 0.7, top-k 20); CFG needs negative_prompt_ids
    GenerationConfig(bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad, do_sample=True,
                     temperature=0.7, top_k=20, max_new_tokens=vocab.layout.span_len - 1).save_pretrained(out)
    shutil.copytree(Path(model_dir) / "image_tokenizer", out / "image_tokenizer", dirs_exist_ok=True)
    (out / "README.md").write_text(model_card(model_dir, bundle, cfg))
    return out


def model_card(model_dir: str | Path, bundle, cfg: VQFusionConfig) -> str:
    v, d = bundle.vocab, bundle.decoder.cfg
    run = Path(model_dir).resolve().parent
    evaluation = next((p for p in (run / "evaluation" / "evaluation.json", run.parent / "evaluation" / "evaluation.json")
                       if p.is_file()), None)
    metrics = ""
    if evaluation is not None:
        e = json.loads(evaluation.read_text())
        vqa, gen, gain = e.get("vqa_test", {}), e.get("generation", {}), e.get("caption_gain_test", {})
        metrics = "\n".join(filter(None, [
            f"- VQA accuracy (test): {vqa['accuracy']:.0%} — " + ", ".join(f"{k} {x:.0%}" for k, x in vqa["per_type"].items())
            if vqa else "",
            f"- judge pass rate (text-to-image): {gen['pass_rate']:.0%} — " +
            ", ".join(f"{k} {x:.0%}" for k, x in gen["per_type"].items()) if gen else "",
            f"- caption information gain: {gain['gain_vs_empty']:.1f} nats per image" if gain else ""]))
    values = (", and every block adds per-block row and column tables to their attention values "
              "(`image_pos_values`)") if d.image_pos_values else ""
    return f"""# vqfusion early-fusion model

One decoder-only transformer (Qwen3 attention with QK-norm, {d.num_layers} layers, hidden {d.hidden_size}) over
one vocabulary: {v.text_size} text tokens, {len(SPECIALS)} specials ({", ".join(SPECIALS)}) and {v.num_codes}
image codes (`<code_0>` …). An image is `<boi>`, {v.layout.grid} rows of {v.layout.grid} codes
{"each closed by `<eol>`" if v.layout.row_separator else "(no row-end tokens)"}, `<eoi>`; image codes also get a
learned row and column embedding (`image_pos_embed`){values}. `image_tokenizer/` turns a {v.layout.grid}×{v.layout.grid}
code grid into pixels (`tokenizer.checkpoint.load_tokenizer` in the vqfusion project).

Exported from `{model_dir}` by `python -m fusion.export`.

## Load

```python
import fusion  # registers the "vqfusion" model type with AutoConfig / AutoModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR)
tok = AutoTokenizer.from_pretrained(DIR)
```

## Measured (the run's evaluation, held-out test scenes)

{metrics or "- no evaluation.json beside the model folder"}

## Limits

Trained only on the data of its run (the run folder's config.yaml names it): it knows that data's words and
images and nothing else. Sampling an image needs the grid constraint (exactly {v.layout.grid * v.layout.grid}
codes, then `<eoi>`); the project's `fusion.sample` applies it.
"""


@hydra.main(version_base=None, config_path="../conf", config_name="export")
@cli
def main(cfg: DictConfig):
    out = export(cfg.model_dir, cfg.out)
    print(f"exported -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    main()
