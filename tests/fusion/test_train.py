"""End to end on tiny real data: train the decoder, sample images and interleaved output, evaluate, reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.runtime import UserError
from fusion.checkpoint import WEIGHTS, load_bundle
from fusion.decoder import code_rows
from fusion.generate import Generator, SamplingConfig
from tests.conftest import run_module

TINY = ["model=test", "seq_len=256", "train.batch_size=4", "text.train_samples=200", "text.vocab_size=300",
        "trainer.max_steps=16", "trainer.val_check_interval=8", "trainer.limit_val_batches=2", "samples.count=2",
        "train.warmup_steps=4", "trainer.log_every_n_steps=4"]


@pytest.fixture(scope="module")
def trained(tiny_codes, shapes_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fusion") / "run"
    run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY)
    return run


@pytest.mark.slow
def test_training_writes_model_samples_and_logs(trained):
    for f in ("model/decoder.safetensors", "model/decoder.json", "model/vocab/vocab.json",
              "model/image_tokenizer/model.safetensors", "samples/latest.png", "checkpoints/last.ckpt",
              "logs/metrics.csv", "config.yaml", "train_summary.json"):
        assert (trained / f).is_file(), f
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["steps"] == 16 and summary["tokens_per_s"] > 0 and summary["data"]["read"] > 0
    assert summary["val"]["val/text_ce"] > 0 and summary["val"]["val/image_ce"] > 0
    header = (trained / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/text_ce" in header and "train/image_ce" in header


@pytest.mark.slow
def test_a_finished_run_continues_under_a_new_task_phase(trained, tiny_codes, shapes_root, tmp_path):
    """last.ckpt holds the final step (checkpoint_every is 500 here, so only the end saved it); the same command
    with a larger max_steps and a phase from there on continues it: stage two of a staged recipe."""
    import shutil

    assert torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 16
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY,
               "trainer.max_steps=20", "resume=auto", "task_phases=[{at:16,tasks:{vqa:1.0}}]")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 20 and summary["resumed_from"] == 16  # its speed counts the 4 steps it trained


@pytest.mark.slow
def test_data_seed_sets_the_stream_and_seed_the_weights(tiny_codes, shapes_root, tmp_path):
    """data_seed (null: seed) draws the training stream; seed alone then starts other weights on the same data,
    so a study can tell a seed's initial weights from its data order (README screen 16); init_donor takes parts
    of another seed's weights and leaves the stream alone (screen 18)."""
    def audit(name: str, *overrides: str) -> tuple[list, str]:
        run = tmp_path / name
        run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY,
                   "trainer.max_steps=3", "trainer.val_check_interval=1000", "samples.count=0", "audit=true",
                   "trainer.precision=32-true", *overrides)
        rows = [json.loads(line) for line in (run / "audit" / "samples_rank0.jsonl").read_text().splitlines()]
        return [r["keys"] for r in rows], json.loads((run / "audit" / "weights_rank0.json").read_text())["sha256"]

    keys, weights = audit("seed0")
    same_data_keys, other_init_weights = audit("seed1_data0", "seed=1", "data_seed=0")
    other_data_keys, _ = audit("seed0_data1", "data_seed=1")
    assert len(keys) == 3 and all(keys)
    assert same_data_keys == keys and other_init_weights != weights
    assert other_data_keys != keys
    # init_donor with every part: seed 0's run starts from seed 1's weights whole, so it ends where seed 1 did
    donor_keys, donor_weights = audit("seed0_donor1", "init_donor={seed: 1, parts: [embeddings, qk, vo, mlp]}")
    assert donor_keys == keys and donor_weights == other_init_weights
    _, part_weights = audit("seed0_donor1_qk", "init_donor={seed: 1, parts: [qk]}")
    assert part_weights not in (weights, other_init_weights)


@pytest.mark.slow
def test_a_time_budget_ends_training_when_spent(tiny_codes, shapes_root, tmp_path):
    """train.time_budget_min: the schedule runs over wall time and training stops when it is spent, far short of
    max_steps (a regression once left the clock unstarted, so the budget was silently ignored)."""
    run = tmp_path / "run"
    run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY,
               "trainer.max_steps=2000", "train.time_budget_min=0.1", "trainer.val_check_interval=2000")
    summary = json.loads((run / "train_summary.json").read_text())
    assert 0 < summary["steps"] < 2000  # 6 s of the tiny model is far short of 2,000 steps


@pytest.mark.slow
def test_sample_command_writes_images_and_interleaved_output(trained, tmp_path):
    run_module("fusion.sample", f"model_dir={trained / 'model'}", f"run_dir={tmp_path / 's'}", "n=2",
               "prompts=['A picture of a red circle.','A picture of two blue squares.']")
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert len(record) == 4 and all(Path(r["image"]).is_file() for r in record)
    assert (tmp_path / "s" / "grid.png").is_file()
    run_module("fusion.sample", f"model_dir={trained / 'model'}", f"run_dir={tmp_path / 'i'}",
               "interleave=['A picture of a blue square.','<image>','Q: How many objects are there? A:','<text>']")
    parts = json.loads((tmp_path / "i" / "samples.json").read_text())
    assert [("image" if "image" in p else "text") for p in parts] == ["text", "image", "text", "text"]


@pytest.mark.slow
def test_evaluate_reports_every_measure(trained, tiny_codes, shapes_root, tmp_path):
    proc = run_module("fusion.evaluate", f"model_dir={trained / 'model'}", f"codes={tiny_codes}", f"data.root={shapes_root}",
                      f"run_dir={tmp_path}", "vqa_images=6", "generation.per_type=2", "seq_len=256", "binding_probe.images=6",
                      "precision=bf16")  # what auto picks where bf16 is the faster (data.runtime.inference_dtype)
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["precision"] == "bfloat16"
    assert set(report["vqa_test"]["per_type"]) == {"colour", "shape", "count", "position", "text"}
    assert report["binding_probe"]["codes"] > 0 and "binding probe" in proc.stdout
    assert 0 <= report["generation"]["pass_rate"] <= 1 and len(report["generation"]["per_type"]) == 5
    assert report["caption_test"]["perplexity"] > 1 and report["text_only_test"]["tokens"] > 0
    assert (tmp_path / "generation_grid.png").is_file() and "VQA accuracy" in proc.stdout
    answers = [json.loads(x) for x in (tmp_path / "vqa_test_answers.jsonl").read_text().splitlines()]
    assert len(answers) == report["vqa_test"]["questions"] and "records" not in report["vqa_test"]
    assert {a["type"] for a in answers} == set(report["vqa_test"]["per_type"]) and all("truth" in a for a in answers)


@pytest.mark.slow
def test_saved_model_reloads_identically_and_refuses_damage(trained, tmp_path, monkeypatch):
    import fusion.decoder

    def no_fresh_start(*a, **kw):
        raise AssertionError("a reload must not draw the mimetic start: the saved weights replace it")

    assert load_bundle(trained / "model").decoder.cfg.mimetic_qk is not None   # the default: a start to skip
    monkeypatch.setattr(fusion.decoder, "mimetic_qk_", no_fresh_start)
    a, b = load_bundle(trained / "model"), load_bundle(trained / "model")
    v = a.vocab
    prompt = [[v.bos, *v.encode_text("A picture of a red circle."), v.boi]]
    sc = SamplingConfig(temperature=0, max_new_tokens=v.layout.span_len)
    assert Generator(a.decoder, v).generate(prompt, sc) == Generator(b.decoder, b.vocab).generate(prompt, sc)
    for k, t in a.decoder.state_dict().items():
        assert torch.equal(t, b.decoder.state_dict()[k])
    import shutil
    broken = tmp_path / "model"
    shutil.copytree(trained / "model", broken)
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_bundle(broken)
    shutil.copytree(trained / "model", tmp_path / "model2")
    meta = json.loads((tmp_path / "model2" / "decoder.json").read_text())
    meta["vocab_fingerprint"] = "0000000000000000"
    (tmp_path / "model2" / "decoder.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not the one the checkpoint was trained with"):
        load_bundle(tmp_path / "model2")


@pytest.mark.slow
def test_a_bf16_reload_computes_what_the_fp32_model_does(trained):
    """Evaluation and sampling run the decoder in bf16 where that is faster (data.runtime.inference_dtype): the
    same logits to bf16's rounding, the same confident choices, and the lean KV cache runs in it."""
    a, b = load_bundle(trained / "model"), load_bundle(trained / "model", dtype=torch.bfloat16)
    assert {p.dtype for p in b.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in b.tokenizer.parameters()} == {torch.float32}  # pixels stay full precision
    v = a.vocab
    prompt = [v.bos, *v.encode_text("A picture of a red circle."), v.boi]
    sc = SamplingConfig(temperature=0, max_new_tokens=v.layout.span_len)
    written = Generator(a.decoder, v).generate([prompt], sc)[0]
    seq = torch.tensor([prompt + written])
    with torch.no_grad():
        la = a.decoder(input_ids=seq).logits.float().log_softmax(-1)
        lb = b.decoder(input_ids=seq).logits.float().log_softmax(-1)
    assert (la - lb).abs().max() < 0.05, (la - lb).abs().max()  # 0.005 nats here (2026-12-06)
    top2 = la.topk(2, -1).values
    sure = (top2[..., 0] - top2[..., 1]) > 0.05  # where fp32 is not near a tie, bf16 picks the same token
    assert sure.sum() > 50 and torch.equal(la.argmax(-1)[sure], lb.argmax(-1)[sure])
    in_bf16 = Generator(b.decoder, b.vocab).generate([prompt], sc)[0]
    assert len(in_bf16) == len(written) and in_bf16[-1] == written[-1] == v.eoi  # a whole image


def test_train_without_code_shards_fails_in_one_line(tmp_path):
    proc = run_module("fusion.train", f"codes={tmp_path}", f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "run tokenizer.pretokenize first" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_every_recipe_switch_trains_and_curves_are_drawn(tiny_fsq_codes, shapes_root, tmp_path):
    """Code features (FSQ levels and pixels, into embeddings and head), Muon, the cosine schedule (the default is
    wsd), per-modality loss balance, no row separators and a compiled training forward, all in one short run on FSQ
    codes; learning curves at each validation; the saved model (plain parameter names) reloads."""
    run = tmp_path / "run"
    run_module("fusion.train", f"codes={tiny_fsq_codes}", f"data.root={shapes_root}", f"run_dir={run}", *TINY,
               "decoder.code_features=[levels,pixels]", "decoder.code_head=true", "train.optimizer=muon", "train.schedule=cosine", "loss.balance=modality",
               "loss.text_weight=2.0", "layout.row_separator=false", "caption_template=0", "curriculum.documents=4", "read_image_loss=true",
               "question_first=true", "extra_qa=[where_by_colour,count_present,count_any,relation_more]", "decoder.image_pos_every_layer=true", "decoder.image_pos_values=true",
               "decoder.image_pos_values_std=0.1", "decoder.qk_gain=2.0", "decoder.mimetic_qk=[0.7,0.7]", "decoder.mimetic_vo=[0.4,0.4]", "restate_referent=true", "worked_answers=true", "task_phases=[{at:0.5,tasks:{vqa:0.8,t2i:0.2}}]", "train.embed_lr_scale=10", "train.head_lr_scale=2", "train.compile=true",
               "curves.gain_images=8", "curves.vqa_images=3",
               "curves.judge_per_type=1")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 16 and summary["compiled"]  # trained through torch.compile, no fallback
    curves = json.loads((run / "curves.json").read_text())
    assert [p["step"] for p in curves] == [8, 16]
    assert 0 < curves[0]["minutes"] < curves[1]["minutes"]  # the schedule's clock runs (it once never started)
    for key in ("caption_gain", "caption_gain_fraction", "vqa_colour", "judge_single", "judge_attr_colour", "tokens"):
        assert key in curves[-1], key
    assert (run / "curves.png").is_file()
    bundle = load_bundle(run / "model")
    assert bundle.decoder.cfg.code_features == ["levels", "pixels"] and bundle.decoder.cfg.code_levels == [4, 4, 4]
    assert bundle.question_first  # the evaluation asks this model its question before the image
    assert bundle.restate_referent and bundle.worked_answers and bundle.decoder.cfg.image_pos_values_std == 0.1 and bundle.decoder.cfg.qk_gain == 2.0
    assert bundle.decoder.cfg.mimetic_qk == (0.7, 0.7) and bundle.decoder.cfg.mimetic_vo == (0.4, 0.4)  # saved, reloaded
    from fusion.export import export

    with pytest.raises(UserError, match="before every block"):  # transformers' blocks add no input positions
        export(run / "model", tmp_path / "export")
    pixels = code_rows(bundle.decoder.embed_tokens).features["pixels"]
    assert pixels.shape == (64, 3 * 4 * 4) and pixels.abs().sum() > 0  # what the codes look like, saved
    assert not bundle.vocab.layout.row_separator
    v = bundle.vocab
    prompt = [[v.bos, *v.encode_text("A picture of a red circle."), v.boi]]
    out = Generator(bundle.decoder, v).generate(prompt, SamplingConfig(max_new_tokens=v.layout.span_len))[0]
    assert v.decode_image([v.boi, *out]).shape == (v.layout.grid, v.layout.grid)


@pytest.mark.slow
def test_factorised_embeddings_refuse_a_vq_tokenizer_in_one_line(tiny_codes, shapes_root, tmp_path):
    proc = run_module("fusion.train", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={tmp_path}", *TINY,
                      "decoder.code_features=[levels]", check=False)
    assert proc.returncode == 2 and "needs an FSQ image tokenizer" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_study_trains_each_variant_per_seed_and_tabulates(tiny_codes, shapes_root, tmp_path):
    out = tmp_path / "study"
    common = [*TINY[:5], "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "samples.count=1",
              "curves.gain_images=4", "curves.vqa_images=2", "curves.judge_per_type=1"]
    quoted = lambda items: "[" + ",".join(f'"{x}"' for x in items) + "]"
    proc = run_module("fusion.study", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={out}", "steps=6",
                      "seeds=[0]", "only=[baseline,describe_first]", f"common={quoted(common)}",
                      f"eval_overrides={quoted(['vqa_images=4', 'max_questions=20', 'generation.per_type=1', 'seq_len=256'])}")
    table = json.loads((out / "study.json").read_text())["variants"]
    assert list(table) == ["baseline", "describe_first"]
    for v in table.values():
        assert v["seeds"] == [0] and v["steps"]["values"] == [6] and v["judge_single"]["mean"] is not None
    assert (out / "study.md").is_file() and (out / "study_curves.png").is_file() and "| baseline |" in proc.stdout
    # the describe-first model wrote a description of each test image before its questions, scored per cell
    described = json.loads((out / "describe_first/seed0/evaluation/evaluation.json").read_text())["vqa_test"]
    assert described["description"]["images"] >= 1 and 0 <= described["description"]["cells"] <= 1
    assert "description" not in json.loads((out / "baseline/seed0/evaluation/evaluation.json").read_text())["vqa_test"]
    assert "vqa_description_cells" in json.loads((out / "describe_first/seed0/curves.json").read_text())[-1]
    again = run_module("fusion.study", f"codes={tiny_codes}", f"data.root={shapes_root}", f"run_dir={out}",
                       "collect_only=true", "only=[describe_first]")
    assert "| describe_first |" in again.stdout and "fusion.train" not in again.stdout


@pytest.mark.slow
def test_export_loads_with_auto_classes_and_computes_what_the_decoder_does(trained, tmp_path):
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    import fusion  # noqa: F401 - registers the "vqfusion" model type
    from fusion.decoder import Decoder, DecoderConfig
    from fusion.hf import ImageGridLogitsProcessor

    out = tmp_path / "export"
    proc = run_module("fusion.export", f"model_dir={trained / 'model'}", f"out={out}")
    assert "exported" in proc.stdout
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                 "image_tokenizer/config.json"):
        assert (out / name).is_file(), name
    bundle = load_bundle(trained / "model")
    v = bundle.vocab
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "VQFusionForCausalLM" and len(tok) == v.size
    text = "A picture of a red circle."
    assert tok(text, add_special_tokens=False)["input_ids"] == v.encode_text(text)
    assert tok.convert_tokens_to_ids(["<boi>", "<code_0>"]) == [v.boi, v.code_offset]
    # two images in one sequence: the 2-D positions of each are read off the ids
    codes = np.random.default_rng(0).integers(0, v.num_codes, (2, v.layout.grid, v.layout.grid))
    ids = torch.tensor([[v.bos, *v.encode_text(text), *v.encode_image(codes[0]), *v.encode_text("Q: A:"),
                         *v.encode_image(codes[1]), v.eos]])
    with torch.no_grad():
        ours = bundle.decoder(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, ours, atol=1e-5)
        # started again from the export (decoder.init_from): the same function, ready to train on
        again = Decoder(DecoderConfig(**{**bundle.decoder.cfg.to_dict(), "init_from": str(out)}), v.size).eval()
        assert torch.allclose(again(input_ids=ids).logits, ours, atol=1e-5)
    # generate() with the grid constraint and transformers' own classifier-free guidance = fusion's sampler
    prompt = [v.bos, *v.encode_text(text), v.boi]
    for scale in (1.0, 3.0):
        sc = SamplingConfig(temperature=0, cfg_scale=scale, max_new_tokens=v.layout.span_len)
        want = Generator(bundle.decoder, v).generate([prompt], sc)[0]
        x = torch.tensor([prompt])
        guidance = {"guidance_scale": scale, "negative_prompt_ids": torch.tensor([[v.bos, v.boi]])} if scale != 1 else {}
        got = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=v.layout.span_len - 1,
                             logits_processor=LogitsProcessorList([ImageGridLogitsProcessor(model.config)]), **guidance)
        got = got[0, x.shape[1]:].tolist()
        assert got == want[:len(got)] and v.decode_image([v.boi, *got]).shape == (v.layout.grid,) * 2

    # a damaged export folder: one line naming the missing file or the disagreement, and the fix
    import json
    import shutil

    from data.runtime import UserError

    for name in ("model.safetensors", "tokenizer.json", "image_tokenizer/model.safetensors"):
        broken = tmp_path / f"broken_{name.replace('/', '_')}"
        shutil.copytree(out, broken)
        (broken / name).unlink()
        with pytest.raises(UserError, match=f"lacks {name} .*python -m fusion.export") as e:
            AutoModelForCausalLM.from_pretrained(broken, local_files_only=True)
        assert "\n" not in str(e.value)
    other = tmp_path / "other_codes"
    shutil.copytree(out, other)
    meta = json.loads((other / "image_tokenizer" / "config.json").read_text())
    key = "fsq_levels" if meta["config"].get("quantizer") == "fsq" else "codebook_size"
    meta["config"][key] = [2, 2] if key == "fsq_levels" else 7
    (other / "image_tokenizer" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"image tokenizer makes [47] codes, the model has {v.num_codes} code rows"):
        AutoModelForCausalLM.from_pretrained(other, local_files_only=True)


def test_export_of_a_bidirectional_reader_reads_its_prompt_image_as_the_project_does(trained, tmp_path):
    """decoder.read_attention=bidirectional survives the export: logits over a read image and a question equal
    the project's decoder, and generate()'s greedy answer is the project's sampler's."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fusion.checkpoint import save_bundle
    from fusion.decoder import read_spans
    from fusion.sequences import Segment, tokenize

    bundle = load_bundle(trained / "model")
    v, dec = bundle.vocab, bundle.decoder
    dec.cfg.read_attention = "bidirectional"
    save_bundle(tmp_path / "model", dec, v, trained / "model" / "image_tokenizer")
    out = tmp_path / "export"
    run_module("fusion.export", f"model_dir={tmp_path / 'model'}", f"out={out}")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert model.config.read_attention == "bidirectional"
    codes = np.random.default_rng(1).integers(0, v.num_codes, (v.layout.grid, v.layout.grid))
    prompt = tokenize(v, [Segment.img(codes, loss=False), Segment.txt("Q: What colour is the circle? A:", loss=False)],
                      add_eos=False).ids
    ids = torch.tensor([prompt])
    spans = read_spans(ids, v.boi, v.eoi)
    with torch.no_grad():
        ours = dec(input_ids=ids, read_span=spans).logits
        causal = dec(input_ids=ids).logits
        assert not torch.allclose(ours, causal, atol=1e-4)  # the mask matters for this model
        assert torch.allclose(model(input_ids=ids).logits, ours, atol=1e-5)
    want = Generator(dec, v).generate([prompt], SamplingConfig(temperature=0, allow_images=False, max_new_tokens=4))[0]
    allowed = [*range(v.text_size), v.eos]
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=len(want),
                         suppress_tokens=[i for i in range(v.size) if i not in allowed])  # reading: text or <eos>
    assert gen[0, ids.shape[1]:].tolist() == want


def test_export_of_value_positions_computes_what_the_decoder_does(trained, tmp_path):
    """decoder.image_pos_values survives the export: the per-block row / column tables on image codes' attention
    values give the same logits, the same greedy image through generate()'s KV cache (with and without
    transformers' CFG), and the same function again when training starts from the export (init_from)."""
    import numpy as np
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from fusion.checkpoint import save_bundle
    from fusion.decoder import Decoder, DecoderConfig
    from fusion.hf import ImageGridLogitsProcessor

    bundle = load_bundle(trained / "model")
    v = bundle.vocab
    torch.manual_seed(0)
    dec = Decoder(replace(bundle.decoder.cfg, image_pos_values=True, image_pos_values_std=0.3), v.size).eval()
    missing, _ = dec.load_state_dict(bundle.decoder.state_dict(), strict=False)
    assert all(k.startswith(("value_rows", "value_cols")) for k in missing)   # none when trained with them (default)
    with torch.no_grad():  # tables of their own, so the function differs from the trained one's
        for e in (*dec.value_rows, *dec.value_cols):
            e.weight.normal_(std=0.3)
            e.weight[0].zero_()
    save_bundle(tmp_path / "model", dec, v, trained / "model" / "image_tokenizer")
    out = tmp_path / "export"
    run_module("fusion.export", f"model_dir={tmp_path / 'model'}", f"out={out}")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert model.config.image_pos_values and "attention values" in (out / "README.md").read_text()
    codes = np.random.default_rng(2).integers(0, v.num_codes, (2, v.layout.grid, v.layout.grid))
    ids = torch.tensor([[v.bos, *v.encode_text("A red circle."), *v.encode_image(codes[0]), *v.encode_text("Q: A:"),
                         *v.encode_image(codes[1]), v.eos]])
    with torch.no_grad():
        ours = dec(input_ids=ids).logits
        assert not torch.allclose(ours, bundle.decoder(input_ids=ids).logits, atol=1e-3)  # the tables matter
        assert torch.allclose(model(input_ids=ids).logits, ours, atol=1e-5)
        again = Decoder(DecoderConfig(**{**dec.cfg.to_dict(), "init_from": str(out)}), v.size).eval()
        assert torch.allclose(again(input_ids=ids).logits, ours, atol=1e-5)
        assert not hasattr(again.lm, "value_rows")  # the export's tables became the decoder's, not a second copy
    prompt = [v.bos, *v.encode_text("A picture of a red circle."), v.boi]
    for scale in (1.0, 3.0):
        want = Generator(dec, v).generate([prompt], SamplingConfig(temperature=0, cfg_scale=scale,
                                                                   max_new_tokens=v.layout.span_len))[0]
        x = torch.tensor([prompt])
        guidance = {"guidance_scale": scale, "negative_prompt_ids": torch.tensor([[v.bos, v.boi]])} if scale != 1 else {}
        got = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=v.layout.span_len - 1,
                             logits_processor=LogitsProcessorList([ImageGridLogitsProcessor(model.config)]), **guidance)
        assert got[0, x.shape[1]:].tolist() == want[:v.layout.span_len - 1]


def test_export_refuses_what_it_cannot_write_in_one_line(tmp_path):
    proc = run_module("fusion.export", f"model_dir={tmp_path / 'nothing'}", f"out={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no trained model at")


def test_compile_setting_auto_compiles_long_runs_only_and_a_bad_value_is_one_line():
    from fusion.train import compile_wanted

    assert compile_wanted("auto", 2500) and compile_wanted("auto", -1) and not compile_wanted("auto", 16)
    assert not compile_wanted("auto", 2500, "fsdp") and compile_wanted("auto", 2500, "ddp")
    assert compile_wanted(True, 16) and not compile_wanted(False, 2500)
    with pytest.raises(UserError, match="train.compile must be true, false or auto"):
        compile_wanted("yes", 100)


def test_task_phases_read_steps_or_fractions_of_the_run_and_reject_the_rest():
    from fusion.train import task_phases

    assert task_phases([], 100) == () and task_phases(None, 100) == ()
    assert task_phases([{"at": 0.6, "tasks": {"vqa": 1}}, {"at": 90, "tasks": {"t2i": 0.5, "vqa": 0.5},
                                                           "curriculum": 5}], 100) == (
        (60, {"vqa": 1.0}, 0, False), (90, {"t2i": 0.5, "vqa": 0.5}, 5, False))
    assert task_phases([{"at": 7, "tasks": {"vqa": 1}, "fork_expert": True}], None)[0][3] is True
    for bad, match in (([{"at": 0, "tasks": {"vqa": 1}}], "step >= 1"), ([{"at": 1.5, "tasks": {"vqa": 1}}], "step >= 1"),
                       ([{"at": 10}], "keys at and tasks"), ([{"at": 0.5, "tasks": {"vqa": 1}}], "max_steps"),
                       (["vqa"], "keys at and tasks"), ([{"at": 10, "tasks": "vqa"}], "map task names to weights"),
                       ([{"at": 10, "tasks": {"vqa": "lots"}}], "map task names to weights"),
                       ([{"at": 10, "tasks": {"vqa": 1}, "curriculum": -1}], "number of steps"),
                       ([{"at": 10, "tasks": {"vqa": 1}, "warmup": 5}], "keys at and tasks"),
                       ([{"at": 10, "tasks": {"vqa": 1}, "fork_expert": "yes"}], "true or false")):
        with pytest.raises(UserError, match=match):
            task_phases(bad, None if match == "max_steps" else 100)


def test_a_task_phase_with_an_unknown_task_fails_in_one_line_before_any_work(tmp_path):
    proc = run_module("fusion.train", f"codes={tmp_path}", f"run_dir={tmp_path / 'run'}",
                      "task_phases=[{at:10,tasks:{draw:1.0}}]", check=False)
    assert proc.returncode == 2 and "unknown tasks ['draw']" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    proc = run_module("fusion.train", f"codes={tmp_path}", f"run_dir={tmp_path / 'run'}",
                      "task_phases=[{at:10,tasks:{vqa:1.0},fork_expert:true}]", check=False)
    assert proc.returncode == 2 and "fork_expert needs decoder.write_expert=true" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
