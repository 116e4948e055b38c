"""ONNX Runtime latency of the three forms of a model: FP32, the QDQ fast graph, the integer graph.

    python -m bench.onnx_speed --json out/onnx_speed.json

For the digits ViT (its 32 calibration images, the 360-image test split) and timm
``deit_tiny_patch16_224`` with random weights (32 random 224×224 calibration images, 32 other
random images to compare on; ``--skip-deit`` leaves it out): quantize in the integer setting,
save the checkpoint, export the FP32 model (``torch.onnx.export``), the QDQ graph
(``export_onnx(..., form="qdq")``) and the integer graph (``export_onnx``), then time each in
ONNX Runtime (CPU, ``intra_op_num_threads=1``, all graph optimizations): the median of
``--repeats`` runs after ``--warmup`` at batch 1 and batch 32, all in this one process, side by
side (fewer runs, at least 3, where they would take over a minute). Prints the latencies, their
ratio to FP32, the file sizes and the top-1 agreement of each ONNX form with the integer engine
(and of FP32 with the engine, for reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export import export_onnx
from quant import QuantConfig, quantize, save_quantized
from quant.integer import IntegerEngine

FORMS = ("fp32", "qdq", "integer")
BATCHES = (1, 32)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_fp32(model: torch.nn.Module, example: torch.Tensor, out: Path) -> Path:
    model = model.eval()
    torch.onnx.export(model, (example,), str(out), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "N"},
                                                             "logits": {0: "N"}},
                      opset_version=18, dynamo=False)
    return out


def latency(sess: ort.InferenceSession, x: np.ndarray, warmup: int, repeats: int,
            budget_s: float = 60.0) -> tuple[float, int]:
    """Median seconds of one run on ``x`` and the number of runs timed: ``repeats``, fewer (at
    least 3, warm-up 1) when they would take more than ``budget_s`` (the integer graph of DeiT
    at batch 32 takes seconds a run)."""
    feed = {"images": x}
    t = time.perf_counter()
    sess.run(None, feed)
    first = time.perf_counter() - t
    if first * (warmup + repeats) > budget_s:
        warmup, repeats = 0, max(3, int(budget_s / max(first, 1e-9)))
    for _ in range(max(warmup - 1, 0)):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times), repeats


def logits(sess: ort.InferenceSession, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run(None, {"images": x[i:i + batch].numpy()})[0]
                           for i in range(0, len(x), batch)])


def bench_model(name: str, fp_model: torch.nn.Module, calib: torch.Tensor, test: torch.Tensor,
                workdir: Path, warmup: int, repeats: int) -> dict:
    t = time.perf_counter()
    qmodel = quantize(fp_model, calib, QuantConfig(setting="integer"))
    calib_s = time.perf_counter() - t
    ckpt = save_quantized(qmodel, workdir / f"{name}.safetensors")
    paths = {"fp32": export_fp32(fp_model, calib[:1], workdir / f"{name}_fp32.onnx"),
             "qdq": export_onnx(ckpt, workdir / f"{name}_qdq.onnx", form="qdq"),
             "integer": export_onnx(ckpt, workdir / f"{name}_integer.onnx")}
    sessions = {f: session(p) for f, p in paths.items()}
    engine = IntegerEngine.load(ckpt)
    with torch.no_grad():
        ref = torch.cat([engine(test[i:i + 32]) for i in range(0, len(test), 32)]).numpy()
    row: dict = {"model": name, "calibration_s": round(calib_s, 1), "test_images": len(test),
                 "forms": {}}
    for form, sess in sessions.items():
        out = logits(sess, test)
        entry = {"file_mb": round(paths[form].stat().st_size / 2**20, 3),
                 "agreement_vs_engine": float((out.argmax(1) == ref.argmax(1)).mean()),
                 "max_abs_logit_diff_vs_engine": float(np.abs(out - ref).max())}
        for b in BATCHES:
            x = test[:b].numpy() if len(test) >= b else test[:1].repeat(b, 1, 1, 1).numpy()
            sec, runs = latency(sess, x, warmup, repeats)
            entry[f"latency_ms_b{b}"] = round(1e3 * sec, 3)
            entry[f"runs_b{b}"] = runs
        row["forms"][form] = entry
    fp = row["forms"]["fp32"]
    for entry in row["forms"].values():
        for b in BATCHES:
            entry[f"vs_fp32_b{b}"] = round(entry[f"latency_ms_b{b}"] / fp[f"latency_ms_b{b}"], 3)
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<24}{'form':<9}{'b1 ms':>9}{'×fp32':>7}{'b32 ms':>10}{'×fp32':>7}"
            f"{'MB':>8}{'top-1 agree':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for form, e in r["forms"].items():
            print(f"{r['model']:<24}{form:<9}{e['latency_ms_b1']:>9.2f}{e['vs_fp32_b1']:>7.2f}"
                  f"{e['latency_ms_b32']:>10.2f}{e['vs_fp32_b32']:>7.2f}{e['file_mb']:>8.2f}"
                  f"{e['agreement_vs_engine']:>13.4f}")
    print("(top-1 agree: with the integer engine's logits on the test images; "
          "ONNX Runtime CPU, 1 thread)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onnx_speed", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-deit", action="store_true", help="the digits ViT only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from quant.zoo.data import digits_data
    from quant.zoo.models import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = digits_data()
        rows.append(bench_model("digits_vit", load_model("digits_vit"), d.calib, d.x_test,
                                Path(tmp), args.warmup, args.repeats))
        if not args.skip_deit:
            import timm

            g = torch.Generator().manual_seed(0)
            model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
            calib = torch.randn(32, 3, 224, 224, generator=g)
            test = torch.randn(32, 3, 224, 224, generator=g)
            rows.append(bench_model("deit_tiny_patch16_224", model, calib, test, Path(tmp),
                                    args.warmup, args.repeats))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python -m bench.onnx_speed " + " ".join(
            argv if argv is not None else sys.argv[1:]), "onnxruntime": ort.__version__,
            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
