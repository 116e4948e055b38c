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
