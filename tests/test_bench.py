"""The accuracy benchmark's pieces, on a tiny model (the full run is `python -m bench.accuracy`)."""

import math

from conftest import FAST

from bench.accuracy import SQNR_KINDS, check_targets, measure, table
from quant import QuantConfig
from quant.evaluate import logits_of
from quant.zoo.data import EvalData


def test_measure_row_and_sqnr(tiny_vit, images):
    labels = logits_of(tiny_vit, images).argmax(-1)
    data = EvalData(images[:8], images, labels, list(range(8)))
    row, sqnr = measure(tiny_vit, data, logits_of(tiny_vit, images), QuantConfig(**FAST))
    assert row["fp32_top1"] == 1.0 and 0 <= row["agreement"] <= 1 and row["kl"] >= 0
    assert row["calib_s"] > 0
    assert set(SQNR_KINDS) <= set(sqnr) and all(math.isfinite(v) for v in sqnr.values())
    text = table([row], list(row))
    assert text.splitlines()[0].startswith("| w_bits") and len(text.splitlines()) == 3


def test_check_targets_flags_a_regression():
    def rows(tsptq_top1):
        out = []
        for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)):
            for m in ("uniform", "twin", "ptf", "tsptq"):
                top1 = tsptq_top1 if m == "tsptq" else 0.90
                out.append({"method": m, "setting": "full", "w_bits": w, "a_bits": a,
                            "top1": top1, "fp32_top1": 0.99, "agreement": top1, "kl": 0.1})
        return out

    sqnr = [{"method": m, "w_bits": w, "a_bits": a, "post_softmax": 1.0, "post_gelu": 1.0,
             "ln_input": 2.0 if m == "tsptq" else 1.0}
            for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)) for m in ("uniform", "twin", "ptf",
                                                                    "tsptq")]
    good = dict(check_targets(rows(0.99), sqnr))
    bad = dict(check_targets(rows(0.95), sqnr))
    assert good["tsptq W8A8 within 0.3 points of FP32"]
    assert not bad["tsptq W8A8 within 0.3 points of FP32"]
    assert good["W4A4: tsptq highest SQNR on ln_input"]


def test_json_report_carries_each_target_verdict(tmp_path, capsys):
    import json

    from bench.accuracy import print_targets, write_json

    checks = [("a met target", True), ("a missed target", False)]
    print_targets(checks)
    write_json(tmp_path / "out" / "r.json", {"rows": [{"x": 1}]}, checks)
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {
        "rows": [{"x": 1}], "targets": [{"target": "a met target", "pass": True},
                                        {"target": "a missed target", "pass": False}]}
    out = capsys.readouterr().out
    assert "PASS  a met target" in out and "FAIL  a missed target" in out


def _integer_rows(tsptq_agreement=0.995, ptf_error=False):
    out = []
    for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)):
        for m in ("uniform", "twin", "ptf", "tsptq"):
            agree = tsptq_agreement if m == "tsptq" else 0.98
            row = {"method": m, "setting": "integer", "w_bits": w, "a_bits": a,
                   "top1": 0.99 - (1 - agree), "fp32_top1": 0.99, "agreement": agree,
                   "kl": 0.01}
            if m == "ptf" and ptf_error:
                row.update(dict.fromkeys(("top1", "fp32_top1", "agreement", "kl")),
                           error="AccumulatorOverflowError: too wide")
            out.append(row)
    return out


def test_check_integer_targets():
    from bench.accuracy import check_integer_targets

    assert check_integer_targets([]) == []  # no integer rows: no integer targets
    good = dict(check_integer_targets(_integer_rows()))
    assert len(good) == 8 and all(good.values())
    bad = dict(check_integer_targets(_integer_rows(tsptq_agreement=0.97)))
    assert not bad["integer: tsptq W8A8 agreement >= 99%"]
    assert not bad["W8A8 integer: tsptq ahead of uniform, twin and ptf by agreement, then KL"]
    # a baseline without an integer program is behind, and the target's name says so
    missing = dict(check_integer_targets(_integer_rows(ptf_error=True)))
    name = ("W4A4 integer: tsptq ahead of uniform, twin and ptf by agreement, then KL "
            "(ptf: no integer program)")
    assert missing[name]


def test_run_grid_integer_rows_and_details(tiny_vit, images, monkeypatch, capsys):
    import bench.accuracy as acc
    from quant.integer import AccumulatorOverflowError

    labels = logits_of(tiny_vit, images).argmax(-1)
    data = EvalData(images[:8], images, labels, list(range(8)))
    real = acc.quantize

    def quantize(model, calib, cfg):
        if cfg.method == "ptf":
            raise AccumulatorOverflowError("blocks.0.attn.av: too wide")
        return real(model, calib, QuantConfig(**{**cfg.__dict__, **FAST}))

    monkeypatch.setattr(acc, "quantize", quantize)
    rows, sqnr, details = acc.run_grid(tiny_vit, data, logits_of(tiny_vit, images), "hessian",
                                       settings=("integer",), methods=("tsptq", "ptf"),
                                       widths=((8, 8),))
    assert [(r["method"], r["setting"]) for r in rows] == [("tsptq", "integer"),
                                                          ("ptf", "integer")]
    assert rows[0]["agreement"] > 0.5 and rows[1]["agreement"] is None
    assert "AccumulatorOverflowError" in rows[1]["error"] and sqnr == []
    assert [k["kernel"] for k in details["kernels"]] == ["softmax", "gelu", "layernorm"]
    assert all(k["method"] == "tsptq" for k in details["kernels"])
    acc_layers = [r for r in details["layers"] if r["accumulator"]]
    assert acc_layers and all(r["worst_case_bits"] <= 32 or r["chunks"] > 1
                              for r in acc_layers)
    acc.print_integer_tables(details, ((8, 8),))
    out = capsys.readouterr().out
    assert "## Integer kernels" in out and "## Worst-case accumulator bits" in out
    assert "blocks.0.attn.av" in out


def test_partial_targets_read_the_partial_rows():
    from bench.accuracy import METHODS, WIDTHS, check_partial_targets

    rows = [{"method": m, "setting": "partial", "w_bits": w, "a_bits": a,
             "agreement": 1.0 if m == "tsptq" else 0.99, "kl": 0.01} for m in METHODS
            for w, a in WIDTHS]
    checks = dict(check_partial_targets(rows))
    assert len(checks) == 2 + len(WIDTHS) and all(checks.values())
    for r in rows:
        if (r["method"], r["w_bits"], r["a_bits"]) == ("tsptq", 6, 6):
            r["agreement"] = 0.9972
        if (r["method"], r["w_bits"]) == ("twin", 8):
            r["agreement"], r["kl"] = 1.0, 0.001  # a tie on agreement goes to the lower KL
    checks = dict(check_partial_targets(rows))
    assert not checks["partial: tsptq W6A6 keeps every decision (100%)"]
    assert not checks["W8A8 partial: tsptq best by agreement, then KL"]
    assert checks["W4A4 partial: tsptq best by agreement, then KL"]
    assert check_partial_targets(rows[:-1]) == []  # a row missing: no targets


def test_text_integer_targets():
    from bench.text import check_integer_targets

    row = {"method": "tsptq", "setting": "integer", "w_bits": 8, "a_bits": 8, "cosine": 0.996,
           "nn_agreement": 0.93}
    assert all(ok for _, ok in check_integer_targets([row]))
    assert not any(ok for _, ok in check_integer_targets([{**row, "nn_agreement": 0.9,
                                                           "cosine": 0.99}]))
    skipped = check_integer_targets([], "UnsupportedModelError: no lowering")
    assert not any(ok for _, ok in skipped)
    assert all("no integer program: UnsupportedModelError" in n for n, _ in skipped)


def test_graphs_bench_times_files_side_by_side(tmp_path, capsys):
    """bench.graphs: alternated medians of ONNX files of one model, and whether each gives the
    first file's outputs bit for bit (a copy does; another model does not)."""
    import json
    import shutil

    from bench.graphs import main
    from export import export_onnx
    from quant import QuantConfig, quantize, save_quantized
    from quant.zoo.data import digits_data
    from quant.zoo.models import load_model

    d = digits_data()
    ckpt = save_quantized(quantize(load_model("digits_vit"), d.calib,
                                   QuantConfig(setting="integer", calib_size=8)),
                          tmp_path / "d.safetensors")
    fast = export_onnx(ckpt, tmp_path / "fast.onnx", form="qdq")
    shutil.copy(fast, tmp_path / "copy.onnx")
    other = export_onnx(ckpt, tmp_path / "int.onnx")  # the integer graph: other logits
    out = tmp_path / "g.json"
    assert main([str(fast), str(tmp_path / "copy.onnx"), str(other), "--batch", "1", "2",
                 "--threads", "1", "--size", "32", "--warmup", "0", "--repeats", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["file"][-9:]) for r in rows] == [
        (b, f) for b in (1, 2) for f in ("fast.onnx", "copy.onnx", "/int.onnx")]
    assert all(0 < r["min_ms"] <= r["latency_ms"] and r["size_bytes"] > 0 for r in rows)
    assert [r["identical_to_first"] for r in rows[:3]] == [True, True, False]
    assert rows[0]["vs_first"] == 1.0
    assert main([str(fast), str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_deploy_bench_rows_and_targets(tmp_path):
    """bench.deploy on the digits ViT, one timed run each: a row per variant, batch and thread
    count with its latency, size and accuracy; the targets read from those rows."""
    from bench.deploy import VARIANTS, bench_workload, image_workload, targets

    rows, extra = bench_workload(image_workload("digits_vit"), tmp_path, warmup=0, repeats=1,
                                 log=lambda s: None)
    assert {(r["variant"], r["batch"], r["threads"]) for r in rows} == {
        (v, b, t) for v in VARIANTS for b in (1, 8) for t in (1, 2)}
    for r in rows:
        assert r["latency_ms"] > 0 and r["size_bytes"] > 0 and 0 <= r["agreement"] <= 1
    by = {r["variant"]: r for r in rows if r["batch"] == 8 and r["threads"] == 2}
    assert by["fp32"]["agreement"] == 1.0 and by["tsptq_integer"]["top1"] > 0.95
    assert by["tsptq_fast"]["size_bytes"] < 0.4 * by["fp32"]["size_bytes"]
    from export.cpu import s8s8_is_exact

    # the same values, int8 grids stored apart (u8u8 writes qkv's column blocks apart)
    fast, s8 = by["tsptq_fast"], by["tsptq_fast_s8s8"]
    assert abs(s8["size_bytes"] - fast["size_bytes"]) < 0.02 * fast["size_bytes"]
    if s8s8_is_exact():
        assert (s8["top1"], s8["agreement"]) == (fast["top1"], fast["agreement"])
    ops = dict((op, ms) for op, ms, _ in extra["profile"]["tsptq_fast"]["ops"])
    assert ops.get("MatMulIntegerToFloat", 0) > 0  # ONNX Runtime fused the int8 matmuls
    assert extra["profile"]["tsptq_fast"]["v2sf_ms"] > 0
    names = {name for name, _, _ in targets(rows)}
    assert "digits tsptq_fast: top-1 within 0.5 points of FP32" in names


def test_rounding_rows_score_validation_and_test(tiny_vit, images, monkeypatch):
    import bench.accuracy as acc

    labels = logits_of(tiny_vit, images).argmax(-1)
    data = EvalData(images[:8], images, labels, list(range(8)), images[8:])
    real = acc.quantize
    monkeypatch.setattr(acc, "quantize", lambda model, calib, cfg: real(
        model, calib, QuantConfig(**{**cfg.__dict__, **FAST})))
    rows = acc.run_rounding(tiny_vit, data, logits_of(tiny_vit, images), "hessian",
                            methods=("tsptq",), widths=((4, 8),), settings=("full",))
    assert [r["weight_rounding"] for r in rows] == ["nearest", "gptq"]
    assert all(0 <= r["val_agreement"] <= 1 and r["val_kl"] >= 0 and r["calib_s"] > 0
               for r in rows)
    assert rows[0]["kl"] != rows[1]["kl"]  # the rounding changed the model
    assert "| tsptq" in acc.table(rows, acc.ROUNDING_COLUMNS)


def test_choices_score_each_option_and_decide_on_validation(tiny_vit, images, monkeypatch,
                                                            capsys):
    """bench.choices on a tiny option set: one row per option, the default marked, test
    metrics beside validation ones, and a decision that reads validation only."""
    import bench.accuracy as acc
    from bench.choices import Choice, decide, digits_rows, report

    labels = logits_of(tiny_vit, images).argmax(-1)
    data = EvalData(images[:8], images, labels, list(range(8)), images[8:])
    real = acc.quantize
    monkeypatch.setattr(acc, "quantize", lambda model, calib, cfg: real(
        model, calib, QuantConfig(**{**cfg.__dict__, **FAST})))
    choice = Choice("outlier_rule", (("threshold", {"outlier_rule": "threshold"}),
                                     ("sorted_split", {"outlier_rule": "sorted_split"})))
    rows = digits_rows(tiny_vit, {0: data}, (choice,), widths=((8, 8),))
    assert [(r["option"], r["default"]) for r in rows] == [("threshold", True),
                                                           ("sorted_split", False)]
    assert all(0 <= r["val_agreement"] <= 1 and r["val_kl"] >= 0 and "top1" in r for r in rows)
    decisions = report("tiny", (choice,), rows, ["option", "val_kl", "kl"], "val_agreement")
    assert decisions[0]["chosen"] in ("threshold", "sorted_split") and "## tiny: decisions" in (
        capsys.readouterr().out)

    def row(option, kl, agree, default=False, seed=0):
        return {"option": option, "val_kl": kl, "val_agreement": agree, "default": default,
                "seed": seed, "kl": 1.0 - kl}  # test KL says the opposite: never read

    a, b = "threshold", "sorted_split"
    assert decide(choice, [row(a, 1.0, 0.9, True), row(b, 0.5, 0.9)])["chosen"] == b
    # Within the tie band the agreement decides, then the default.
    assert decide(choice, [row(a, 1.0, 0.9, True), row(b, 0.99, 0.95)])["chosen"] == b
    assert decide(choice, [row(a, 1.0, 0.9, True), row(b, 0.99, 0.9)])["chosen"] == a
    # Every draw counts: a win on one draw, a larger loss on the other.
    two = decide(choice, [row(a, 1.0, 0.9, True), row(b, 0.8, 0.9),
                          row(a, 1.0, 0.9, True, 1), row(b, 1.5, 0.9, seed=1)])
    assert two["chosen"] == a and two["scores"][b]["val_kl_per_draw"] == [0.8, 1.5]


def test_scale_bench_timing_row_on_a_small_folder(tmp_path):
    from bench.imagefolder import FolderSpec, write_image_folder
    from bench.scale import time_model

    root = write_image_folder(tmp_path / "f", FolderSpec(classes=4, train_per_class=4,
                                                         val_per_class=2, size=32))
    row = time_model("vit_tiny_patch16_224", root, calib=4, val=8, img_size=32, patch_size=8,
                     depth=1, num_classes=4)
    # seconds are rounded (a tiny model may round to 0); every figure is there and finite
    for key in ("forward_32_s", "calibration_full_s", "calibration_integer_s",
                "s_per_candidate"):
        assert 0 <= row[key] < 600, key
    assert row["fp32_images_per_s"] > 0 and row["quantized_images_per_s"] > 0
    # one block: its searched quantizers, each probed at every lower width
    assert row["probes"] == 3 * row["quantizers"]
    assert row["candidates_at_most"] == 1 + row["probes"] + 2 * row["max_steps"]


def test_scale_bench_peak_rss_tells_the_dispatcher_from_its_forked_loader_workers():
    """The service's dispatcher and the DataLoader workers forked from it share one command
    line; their peaks are kept apart by parentage (a process tree shaped like the service's)."""
    import subprocess
    import sys
    import time

    from bench.scale import PeakRss

    # server → dispatcher ("service.cli worker") → a fork of it holding ~64 MB more
    dispatcher = ("import os, time\n"
                  "if os.fork() == 0:\n"
                  "    held = b'x' * (64 << 20)\n"
                  "    time.sleep(30)\n"
                  "time.sleep(30)\n")
    server = (f"import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {dispatcher!r}, 'service.cli worker'])\n"
              f"time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", server])
    try:
        with PeakRss(proc.pid, interval_s=0.1) as peaks:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                    "dispatcher" in peaks.peaks
                    and peaks.peaks.get("data_loader_worker", 0) > 64 << 20
                    # RSS passes 64 MB (shared interpreter pages count) before the held
                    # bytes are all written; wait for the worker's own pages too
                    and peaks.peaks.get("data_loader_worker_uss", 0) >= 64 << 20):
                time.sleep(0.1)
        summary = peaks.summary()
    finally:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
    assert summary["data_loader_worker_mb"] >= 64 > summary["dispatcher_mb"] > 0
    assert summary["data_loader_worker_uss_mb"] >= 64  # its own pages, not the dispatcher's
    assert summary["ray_workers_mb"] == []
