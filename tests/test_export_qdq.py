"""The QDQ fast graph (``export_onnx(..., form="qdq")``): it passes ONNX's full check, ONNX
Runtime fuses its matmuls into int8 kernels, and its top-1 agrees with the integer engine's on
≥ 99.7 % of the digits test split."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from export import export_onnx, export_qdq
from export.cpu import s8s8_is_exact
from export.graph import unused_nodes
from quant import QuantConfig, quantize, save_quantized
from quant.checkpoint import CheckpointError
from quant.integer import IntegerEngine
from quant.zoo.data import digits_data
from quant.zoo.models import load_model

ort = pytest.importorskip("onnxruntime")

INT8_MATMULS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
                "MatMulIntegerToFloat"}


@pytest.fixture(scope="module")
def digits():
    return digits_data()


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qdq")
    qmodel = quantize(load_model("digits_vit"), digits.calib, QuantConfig(setting="integer"))
    ckpt = save_quantized(qmodel, tmp / "digits.safetensors")
    return ckpt, export_onnx(ckpt, tmp / "digits_qdq.onnx", form="qdq"), tmp


def _session(path, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_qdq_graph_passes_the_full_check(exported):
    _, path, _ = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert unused_nodes(model.graph) == []
    # 8-bit post-GELU zero points meet the coarse grid (QuantConfig.aligned_gelu_zero): no
    # fine operand needs the five-pass step at the split
    assert [n.name for n in model.graph.node if "_step" in n.name] == []
    kinds = collections.Counter(n.op_type for n in model.graph.node)
    assert kinds["QuantizeLinear"] and kinds["DequantizeLinear"] and kinds["MatMul"]
    assert "MatMulInteger" not in kinds  # the fast form, not the integer graph
    # the weights' int8 codes, stored shifted by 128 as uint8 (zero point 128): exact
    # uint8 × uint8 kernels on every x86 CPU (``qdq_builder``)
    ints = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    big = [t for t in ints if len(t.dims) == 2]
    assert big, "weights are stored as 8-bit codes"
    assert path.stat().st_size < 0.5 * sum(  # 8-bit weights: far smaller than float32 ones
        4 * int(np.prod(t.dims)) for t in big) + 200_000


def test_a_graph_with_a_node_no_output_needs_is_refused():
    """A builder that leaves work behind (ONNX Runtime runs an unread node on every pass)."""
    from onnx import TensorProto, helper

    from export.graph import finish_model

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="used"),
             helper.make_node("Neg", ["x"], ["n"], name="dead"),
             helper.make_node("Abs", ["n"], ["a"], name="dead_too")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:])
    assert unused_nodes(graph) == ["dead_too", "dead"]
    with pytest.raises(AssertionError, match="dead"):
        finish_model(graph, "g")
    del graph.node[1:]
    assert finish_model(graph, "g").graph.node[0].name == "used"


def test_onnxruntime_fuses_int8_matmuls(exported):
    _, path, tmp = exported
    opt = tmp / "digits_qdq.opt.onnx"
    _session(path, optimized=opt)
    kinds = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    fused = sum(kinds[k] for k in INT8_MATMULS)
    # 4 blocks × (qkv, proj, fc1, fc2 fine + coarse, Q·Kᵀ, A·V fine + coarse)
    assert fused >= 32, kinds
    assert kinds["MatMul"] == 0, kinds


def test_qdq_agrees_with_the_integer_engine(exported, digits):
    ckpt, path, _ = exported
    ref = IntegerEngine.load(ckpt)(digits.x_test).numpy()
    sess = _session(path)
    (got,) = sess.run(None, {"images": digits.x_test.numpy()})
    assert got.shape == ref.shape and got.dtype == np.float32
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    assert len(got) == 360 and agree >= 0.997, agree
    (one,) = sess.run(None, {"images": digits.x_test[:1].numpy()})  # dynamic batch
    np.testing.assert_allclose(one, got[:1], rtol=1e-4, atol=1e-4)


def test_per_channel_qdq_o2sf_gives_the_same_graph_values(exported, digits, tmp_path):
    """O-2SF as a per-channel QuantizeLinear/DequantizeLinear pair (int8, axis −1) rather than
    float ops: the same fake-quantized values, so (nearly) the same logits."""
    ckpt, path, _ = exported
    alt = export_qdq(ckpt, tmp_path / "pc.onnx", per_channel_qdq=True)
    kinds = collections.Counter(n.op_type for n in onnx.load(str(alt)).graph.node)
    assert "Round" not in kinds and "Round" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = digits.x_test[:64].numpy()
    (a,) = _session(path).run(None, {"images": x})
    (b,) = _session(alt).run(None, {"images": x})
    assert (a.argmax(1) == b.argmax(1)).all()
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_s8s8_operands_are_int8_fused_and_exact_where_the_cpu_has_vnni(exported, digits,
                                                                       tmp_path):
    """``operands="s8s8"``: the same grids stored as int8 (weights' zero point 0), every matmul
    still fused; where ONNX Runtime's int8 kernels are exact (VNNI, ARM) its logits are
    bit-identical to the u8u8 graph's, the integer sums being the same."""
    ckpt, path, _ = exported
    s8 = export_onnx(ckpt, tmp_path / "s8.onnx", form="qdq", operands="s8s8")
    model = onnx.load(str(s8))
    onnx.checker.check_model(model, full_check=True)
    types = collections.Counter(t.data_type for t in model.graph.initializer if len(t.dims) == 2)
    assert types[onnx.TensorProto.INT8] and not types[onnx.TensorProto.UINT8], types
    # one byte per code either way (u8u8 writes qkv's three column blocks apart: a few nodes)
    assert abs(s8.stat().st_size - path.stat().st_size) < 0.02 * path.stat().st_size
    opt = tmp_path / "s8.opt.onnx"
    _session(s8, optimized=opt)
    kinds = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert sum(kinds[k] for k in INT8_MATMULS) >= 32 and kinds["MatMul"] == 0, kinds
    x = {"images": digits.x_test.numpy()}
    (u,) = _session(path).run(None, x)
    (s,) = _session(s8).run(None, x)
    if s8s8_is_exact():
        assert np.array_equal(u, s)
    else:  # saturating int16 sums: close, not equal (the reason u8u8 is the default)
        assert float((u.argmax(1) == s.argmax(1)).mean()) >= 0.95
    with pytest.raises(ValueError, match="operands"):
        export_onnx(ckpt, tmp_path / "x.onnx", form="qdq", operands="s4s4")


def test_export_qdq_direct_and_bad_inputs(exported, tmp_path, digits):
    ckpt, path, _ = exported
    again = export_qdq(ckpt, tmp_path / "again.onnx")
    assert again.read_bytes() == path.read_bytes()  # deterministic
    with pytest.raises(ValueError, match="form"):
        export_onnx(ckpt, tmp_path / "x.onnx", form="nope")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        export_qdq(junk, tmp_path / "junk.onnx")


@pytest.mark.parametrize("setting,method", [("full", "tsptq"), ("partial", "tsptq"),
                                            ("full", "twin")])
def test_float_setting_checkpoints_get_the_fast_graph(digits, tmp_path, setting, method):
    """A full- or partial-setting job has no integer program, but its quantizers have a QDQ
    form: the fast graph runs the simulation's own float LayerNorm/Softmax/GELU, so its logits
    follow the simulator's closely (twin: the sign-rule V-2SF)."""
    import torch

    from quant import load_quantized

    cfg = QuantConfig(setting=setting, method=method, calib_size=16)
    qmodel = quantize(load_model("digits_vit"), digits.calib[:16], cfg)
    path = export_qdq(save_quantized(qmodel, tmp_path / "q.safetensors"), tmp_path / "q.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = digits.x_test[:120]
    with torch.no_grad():
        ref = load_quantized(tmp_path / "q.safetensors")(x).numpy()
    (got,) = _session(path).run(None, {"images": x.numpy()})
    assert float((got.argmax(1) == ref.argmax(1)).mean()) >= 0.99
    np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))


@pytest.mark.parametrize("bits,scale,shift,zero,offset,floor,rule", [
    (8, 0.01, 3, 9, False, -0.17, "value"),  # post-GELU: the general case (t + 1 off the grid)
    (8, 0.004, 2, 0, False, 0.0, "value"),   # post-Softmax: both fine clips are saturations
    (8, 0.01, 4, 16, False, -0.17, "value"),  # t + 1 = 2^m·k0 with z > 0
    (8, 0.01, 3, 9, True, -0.17, "value"),   # coarse_offset
    (6, 0.03, 2, 3, False, -0.17, "value"),  # fewer bits on the same int8 grids
    (8, 0.01, 3, 20, False, -0.17, "value"),  # the lower clip spared (z·s ≥ GELU's minimum)
    (8, 0.02, 3, 16, False, -0.17, "value"),  # t + 1 = 2^m·k0, the lower clip spared
    (8, 0.01, 3, 7, False, -0.17, "value"),  # t = 2^m·(k0 − 1): A on the coarse grid
    (8, 0.01, 2, 27, False, -0.17, "value"),  # the same, the lower clip spared
    (8, 0.01, 2, 27, True, -0.17, "value"),  # the same with coarse_offset
    (8, 0.002, 4, 85, False, -0.17, "sign"),  # PTQ4ViT's twin: negatives fine, the rest coarse
])
def test_v2sf_parts_sum_to_the_fake_quantized_value(bits, scale, shift, zero, offset, floor,
                                                    rule):
    """The fine and coarse int8 operands of the QDQ graph add up to the quantizer's fake
    quantization, value by value, on both sides of the split and beyond both ends."""
    import torch
    from onnx import TensorProto, helper

    from export.graph import finish_model
    from export.qdq_builder import QdqGraph
    from quant.quantizers import TwoScaleValueQuantizer

    q = TwoScaleValueQuantizer(bits, rule, signed=floor < 0, coarse_offset=offset)
    q.set_params(scale, shift, zero)
    g = QdqGraph()
    parts = g.quantize("x", q, "v", floor=floor)  # exact parts
    (fine, coarse), offset = g.operands("x", q, "w", floor=floor)  # what a matmul reads
    assert len(parts) == 2
    g.nodes.append(helper.make_node("Add", parts, ["y"], name="sum"))
    g.nodes.append(helper.make_node("Add", [fine, coarse], ["z_sum"], name="sum2"))
    g.nodes.append(helper.make_node("Sub", ["z_sum", g.const(np.float32(offset))], ["z"],
                                    name="off"))
    graph = helper.make_graph(g.nodes, "v2sf", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None])], [helper.make_tensor_value_info(
            n, TensorProto.FLOAT, [None]) for n in ("y", "z")], initializer=g.inits)
    model = finish_model(graph, "v2sf")  # refuses a node no output needs
    onnx.checker.check_model(model, full_check=True)
    top = float(q.scale) * ((q._coarse_start(shift, zero) + q.coarse_max) << shift)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=gen) * (1.3 * top - floor) + floor,
                   torch.linspace(q.split_threshold * 0.9, q.split_threshold * 1.2, 5001)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got, via_offset = sess.run(None, {"x": x.numpy()})
    want = q.fake_quant(x).numpy()
    assert (x >= q._threshold()).any() and (x < q._threshold()).any()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * top)
    np.testing.assert_allclose(via_offset, want, rtol=0, atol=1e-5 * top)


def test_distilled_deit_fast_graph_averages_its_heads(quantized, images, tmp_path):
    """A distilled DeiT: class and distillation tokens, two heads averaged at inference; the
    fast graph follows the integer engine (random weights: near-ties, so logits, not top-1)."""
    qmodel = quantized("deit", setting="integer")
    assert hasattr(qmodel.model, "head_dist")
    ckpt = save_quantized(qmodel, tmp_path / "deit.safetensors")
    path = export_qdq(ckpt, tmp_path / "deit.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ref = IntegerEngine.load(ckpt)(images).numpy()
    (got,) = _session(path).run(None, {"images": images.numpy()})
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - ref).max()) < 0.1 * scale
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert float(cos.min()) > 0.99, cos
