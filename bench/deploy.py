"""Deployment benchmark: what a quantized model costs and keeps in ONNX Runtime (CPU).

    python -m bench.deploy --json out/deploy.json        (make bench-deploy)

Side by side in one process, for the digits ViT (its 32 calibration images, the 360-image test
split), timm ``deit_tiny_patch16_224`` and ``deit_small_patch16_224`` with *random weights*
(latency does not depend on the weights; 32 random calibration images, 32 others to compare on,
so their accuracy is the agreement with FP32 only) and MiniLM (its calibration texts and test
texts; latency on 8 texts of 128 tokens), five variants of one model:

* ``fp32``: ``torch.onnx.export`` of the FP32 model;
* ``ort_dynamic``: ONNX Runtime's ``quantize_dynamic`` of that file (int8 weights, activations
  quantized at run time);
* ``ort_static``: ONNX Runtime's ``quantize_static`` (QDQ, S8S8, MinMax, the same calibration
  inputs tsptq calibrates on);
* ``tsptq_fast``: tsptq's W8A8 integer-setting checkpoint as its fast QDQ graph
  (``export_onnx(..., form="qdq")``, uint8 × uint8 operands: exact on every CPU);
* ``tsptq_fast_s8s8``: the same graph with int8 × int8 operands (``operands="s8s8"``): faster
  where the CPU has VNNI, where it is also exact; inexact on x86 without VNNI (the report says
  which holds here);
* ``tsptq_integer``: the same checkpoint as its integer graph (bit-identical to the engine).

For each: the median latency of ``--repeats`` (20) timed runs after ``--warmup`` (3) at batch 1
and 8 with 1 and 2 intra-op threads (all graph optimizations), the file size, and the accuracy
of the model on the test inputs (images: top-1 where there are labels and top-1 agreement with
FP32; texts: mean cosine and nearest-neighbour agreement of the sentence embeddings with FP32's).
It prints the CPU's int8 instruction sets and ONNX Runtime's per-operator profile of the
tsptq graphs of the largest model at batch 8, 2 threads, with the share of the time that
TSPTQ's two-scale operands (V-2SF: a second int8 matmul and its clips) take.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export import export_onnx
from export.cpu import int8_flags, s8s8_is_exact
from quant import QuantConfig, quantize, save_quantized

VARIANTS = ("fp32", "ort_dynamic", "ort_static", "tsptq_fast", "tsptq_fast_s8s8",
            "tsptq_integer")
FAST = ("tsptq_fast", "tsptq_fast_s8s8")
BATCHES = (1, 8)
THREADS = (1, 2)
TEXT_TOKENS = 128
# Operators of the fast graph that exist for V-2SF only (the coarse operand, its clips, the sum
# of the two products), matched on the node names the exporter writes.
V2SF_NODE_MARKS = ("_fc2_in", "_attn_a_", "_fc2_sum", "_av_sum", "_fc2_0_in")


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    calib: object             # images (N, 3, H, W) or a dict of token tensors
    test: object
    labels: torch.Tensor | None
    latency_input: dict       # one batch of 8, as ONNX feeds
    random_weights: bool

    @property
    def is_text(self) -> bool:
        return isinstance(self.calib, dict)


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    """``profile``: ONNX Runtime's per-node profile, written beside the model (a temporary
    directory), not in the working directory."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.with_suffix("")) + "_profile"
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# -- the FP32 file and ONNX Runtime's own quantizers --
def export_fp32(w: Workload, out: Path) -> Path:
    model = w.model.eval()
    if w.is_text:
        class Hidden(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        names = ["input_ids", "attention_mask", "token_type_ids"]
        ex = tuple(torch.from_numpy(w.latency_input[n][:1]) for n in names)
        torch.onnx.export(Hidden(model), ex, str(out), input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "N", 1: "L"} for n in names}
                          | {"last_hidden_state": {0: "N", 1: "L"}},
                          opset_version=18, dynamo=False)
    else:
        torch.onnx.export(model, (w.calib[:1],), str(out), input_names=["images"],
                          output_names=["logits"],
                          dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                          opset_version=18, dynamo=False)
    return out


def feeds(w: Workload, inputs, batch: int = 8) -> list[dict]:
    """The inputs as ONNX feeds in batches (texts: one batch per text, unpadded, as the
    embedding comparison runs them)."""
    if isinstance(inputs, dict):
        mask = inputs["attention_mask"]
        out = []
        for i in range(len(mask)):
            n = int(mask[i].sum())
            out.append({k: v[i:i + 1, :n].numpy() for k, v in inputs.items()})
        return out
    return [{"images": inputs[i:i + batch].numpy()} for i in range(0, len(inputs), batch)]


def ort_quantized(w: Workload, fp32: Path, workdir: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / f"{w.name}_pre.onnx"
    with contextlib.chdir(workdir):
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds(w, w.calib))

        def get_next(self):
            return next(self.it, None)

    dyn, static = workdir / f"{w.name}_ort_dynamic.onnx", workdir / f"{w.name}_ort_static.onnx"
    with contextlib.chdir(workdir):  # their temporary files land in the working directory
        quantize_dynamic(str(pre), str(dyn), weight_type=QuantType.QInt8)
        quantize_static(str(pre), str(static), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"ort_dynamic": dyn, "ort_static": static}


# -- measurements --
def latency_ms(sess: ort.InferenceSession, feed: dict, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def outputs(sess: ort.InferenceSession, w: Workload) -> torch.Tensor:
    """Logits of the test images, or sentence embeddings of the test texts."""
    from quant.text import mean_pool

    outs = []
    for feed in feeds(w, w.test):
        (y,) = sess.run(None, {k: v for k, v in feed.items()
                               if k in {i.name for i in sess.get_inputs()}})
        y = torch.from_numpy(np.ascontiguousarray(y))
        if w.is_text:
            y = mean_pool(y, torch.from_numpy(feed["attention_mask"]))  # normalised
        outs.append(y)
    return torch.cat(outs)


def accuracy(w: Workload, got: torch.Tensor, ref: torch.Tensor) -> dict:
    if w.is_text:
        from quant.text import compare_embeddings

        c = compare_embeddings(ref, got)
        return {"cosine": round(c.cosine, 5), "nn_agreement": round(c.nn_agreement, 4)}
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    top1 = None if w.labels is None else float((got.argmax(1) == w.labels).float().mean())
    return {"top1": None if top1 is None else round(top1, 4), "agreement": round(agree, 4)}


def profile(path: Path, feed: dict, runs: int = 5) -> tuple[list[tuple[str, float, int]], float]:
    """(op type, ms per run, nodes) by time, and the ms per run of V-2SF's own nodes."""
    sess = session(path, 2, profile=True)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, count, v2sf = collections.Counter(), collections.Counter(), 0.0
    pairs = collections.defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op, node = e["args"]["op_name"], e["name"][:-len("_kernel_time")]
        by_op[op] += e["dur"]
        count[op] += 1
        if any(mark in node for mark in V2SF_NODE_MARKS):
            v2sf += e["dur"]
        elif op == "MatMulIntegerToFloat" and ("_fc2_mm" in node or "_av_mm" in node):
            pairs[node.rsplit("_", 1)[0]].append(e["dur"])
    # each V-2SF product is two matmuls of one shape: the second (coarse) one is its cost
    v2sf += sum(sum(d) / 2 for d in pairs.values() if len(d) >= 2 * runs)
    rows = [(op, d / runs / 1e3, count[op] // runs) for op, d in by_op.most_common()]
    return rows, v2sf / runs / 1e3


def bench_workload(w: Workload, workdir: Path, warmup: int, repeats: int, log=print,
                   variants: tuple[str, ...] = VARIANTS) -> tuple[list[dict], dict]:
    """Rows for ``variants`` (FP32, the reference, always), and the tsptq graphs' profiles."""
    variants = tuple(v for v in VARIANTS if v in variants or v == "fp32")
    t = time.perf_counter()
    qmodel = quantize(w.model, w.calib, QuantConfig(setting="integer"))
    calib_s = time.perf_counter() - t
    ckpt = save_quantized(qmodel, workdir / f"{w.name}.safetensors")
    paths = {"fp32": export_fp32(w, workdir / f"{w.name}_fp32.onnx")}
    if {"ort_dynamic", "ort_static"} & set(variants):
        paths.update(ort_quantized(w, paths["fp32"], workdir))
    for variant, form, operands in (("tsptq_fast", "qdq", "u8u8"),
                                    ("tsptq_fast_s8s8", "qdq", "s8s8"),
                                    ("tsptq_integer", "integer", "u8u8")):
        if variant in variants:  # only what is asked for: the integer export takes a while
            paths[variant] = export_onnx(ckpt, workdir / f"{w.name}_{variant}.onnx", form=form,
                                         operands=operands)
    paths = {v: paths[v] for v in variants}
    log(f"{w.name}: calibrated in {calib_s:.0f} s, exported")
    ref = outputs(session(paths["fp32"], 2), w)
    acc = {v: accuracy(w, outputs(session(p, 2), w), ref) for v, p in paths.items()}
    rows = []
    for threads in THREADS:
        sessions = {v: session(p, threads) for v, p in paths.items()}
        for batch in BATCHES:
            feed = {k: v[:batch] for k, v in w.latency_input.items()}
            for v in variants:
                feed_v = {k: x for k, x in feed.items()
                          if k in {i.name for i in sessions[v].get_inputs()}}
                ms = latency_ms(sessions[v], feed_v, warmup, repeats)
                rows.append({"model": w.name, "variant": v, "batch": batch, "threads": threads,
                             "latency_ms": round(ms, 3),
                             "size_bytes": paths[v].stat().st_size, **acc[v],
                             "random_weights": w.random_weights})
                log(f"  {v:<14} b{batch} t{threads} {ms:9.2f} ms")
    feed = {k: v[:8] for k, v in w.latency_input.items()}
    prof = {}
    for v in (*FAST, "tsptq_integer"):
        if v not in paths:
            continue
        ops, v2sf = profile(paths[v], feed)
        prof[v] = {"ops": ops, "v2sf_ms": round(v2sf, 2)}
    return rows, {"model": w.name, "calibration_s": round(calib_s, 1), "profile": prof}


# -- the workloads --
def image_workload(name: str) -> Workload:
    g = torch.Generator().manual_seed(0)
    if name == "digits_vit":
        from quant.zoo.data import digits_data
        from quant.zoo.models import load_model

        d = digits_data()
        lat = d.x_test[:8]
        return Workload(name, load_model(name), d.calib, d.x_test, d.y_test,
                        {"images": lat.numpy()}, False)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    calib = torch.randn(32, 3, 224, 224, generator=g)
    test = torch.randn(32, 3, 224, 224, generator=g)
    return Workload(name, model, calib, test, None, {"images": test[:8].numpy()}, True)


def text_workload(test_limit: int | None) -> Workload:
    from quant.zoo.models import load_model
    from quant.zoo.text import text_data

    d = text_data(test_limit=test_limit)
    ids = d.x_test["input_ids"]
    mask = d.x_test["attention_mask"]
    rows = []  # 8 real texts' tokens, repeated to 128 (their [CLS] first, [SEP] last)
    for i in range(8):
        t = ids[i, :int(mask[i].sum())]
        body = t[1:-1].repeat(TEXT_TOKENS // max(len(t) - 2, 1) + 1)[:TEXT_TOKENS - 2]
        rows.append(torch.cat([t[:1], body, t[-1:]]))
    lat = torch.stack(rows)
    feed = {"input_ids": lat.numpy(), "attention_mask": np.ones_like(lat.numpy()),
            "token_type_ids": np.zeros_like(lat.numpy())}
    test = dict(d.x_test)
    test.setdefault("token_type_ids", torch.zeros_like(ids))
    calib = dict(d.calib)
    calib.setdefault("token_type_ids", torch.zeros_like(calib["input_ids"]))
    return Workload("minilm", load_model("minilm"), calib, test, None, feed, False)


# -- report --
def targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's bars, from the rows (W8A8, batch 8, 2 threads)."""
    at = {(r["model"], r["variant"], r["batch"], r["threads"]): r for r in rows}
    out = []
    for model in ("deit_small_patch16_224", "minilm"):
        fp, dyn = at.get((model, "fp32", 8, 2)), at.get((model, "ort_dynamic", 8, 2))
        for v in FAST:
            fast = at.get((model, v, 8, 2))
            if not (fp and fast and dyn):
                continue
            s = fp["latency_ms"] / fast["latency_ms"]
            out.append((f"{model}: {v} ≥ 2× faster than fp32 (b8, 2 threads)", s >= 2,
                        f"{s:.2f}×"))
            out.append((f"{model}: {v} no slower than ort_dynamic (b8, 2 threads)",
                        fast["latency_ms"] <= dyn["latency_ms"],
                        f"{fast['latency_ms']:.1f} vs {dyn['latency_ms']:.1f} ms"))
    for v in (*FAST, "tsptq_integer"):
        r = at.get(("minilm", v, 8, 2))
        if r:
            out.append((f"minilm {v}: cosine ≥ 0.995, NN ≥ 92%",
                        r["cosine"] >= 0.995 and r["nn_agreement"] >= 0.92,
                        f"{r['cosine']:.4f}, {100 * r['nn_agreement']:.1f}%"))
        r, fp = at.get(("digits_vit", v, 8, 2)), at.get(("digits_vit", "fp32", 8, 2))
        if r and fp:
            drop = 100 * (fp["top1"] - r["top1"])
            out.append((f"digits {v}: top-1 within 0.5 points of FP32", drop <= 0.5,
                        f"{100 * r['top1']:.2f}% vs {100 * fp['top1']:.2f}%"))
    for model in sorted({r["model"] for r in rows}):
        fp = at.get((model, "fp32", 8, 2))
        fast = at.get((model, "tsptq_fast", 8, 2)) or at.get((model, "tsptq_fast_s8s8", 8, 2))
        if fp and fast:
            ratio = fast["size_bytes"] / fp["size_bytes"]
            out.append((f"{model}: tsptq_fast file ≤ 27% of fp32", ratio <= 0.27,
                        f"{100 * ratio:.1f}%"))
    return out


def print_report(rows: list[dict], extra: list[dict]) -> None:
    print(f"CPU int8 instruction sets: {', '.join(int8_flags()) or 'none found'}; "
          f"onnxruntime {ort.__version__}; its int8 × int8 (s8s8) kernels are "
          f"{'exact' if s8s8_is_exact() else 'INEXACT (saturating int16 sums)'} on this CPU")
    head = (f"{'model':<24}{'variant':<15}{'b':>3}{'thr':>4}{'ms':>10}{'×fp32':>7}{'MB':>8}"
            f"  accuracy")
    print(head)
    print("-" * (len(head) + 24))
    fp = {(r["model"], r["batch"], r["threads"]): r["latency_ms"] for r in rows
          if r["variant"] == "fp32"}
    for r in rows:
        acc = (f"cos {r['cosine']:.4f} NN {100 * r['nn_agreement']:.1f}%" if "cosine" in r else
               ("" if r["top1"] is None else f"top-1 {100 * r['top1']:.2f}% ")
               + f"agree {100 * r['agreement']:.2f}%")
        speed = fp[(r["model"], r["batch"], r["threads"])] / r["latency_ms"]
        print(f"{r['model']:<24}{r['variant']:<15}{r['batch']:>3}{r['threads']:>4}"
              f"{r['latency_ms']:>10.2f}{speed:>7.2f}{r['size_bytes'] / 2**20:>8.2f}  {acc}")
    print("(×fp32: FP32 latency / this latency, higher is faster; accuracy against FP32; "
          "deit_* have random weights)")
    for e in extra:
        for v, p in e["profile"].items():
            total = sum(ms for _, ms, _ in p["ops"])
            print(f"\nprofile {e['model']} {v}, batch 8, 2 threads ({total:.1f} ms of kernels"
                  + (f"; V-2SF's own nodes and coarse matmuls {p['v2sf_ms']:.1f} ms"
                     if v in FAST else "") + "):")
            for op, ms, n in p["ops"][:12]:
                print(f"  {op:<26}{ms:>9.2f} ms {100 * ms / total:5.1f}%  ×{n}")
    print()
    for name, ok, value in targets(rows):
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--models", default="digits_vit,deit_tiny_patch16_224,deit_small_patch16_224,"
                   "minilm", help="comma-separated (default: all four)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated (default: all six; fp32 always runs)")
    p.add_argument("--text-limit", type=int, default=None,
                   help="MiniLM: this many test texts (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows, extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            w = text_workload(args.text_limit) if name == "minilm" else image_workload(name)
            r, e = bench_workload(w, Path(tmp), args.warmup, args.repeats,
                                  log=lambda s: print(s, file=sys.stderr, flush=True),
                                  variants=tuple(args.variants.split(",")))
            rows += r
            extra.append(e)
    largest = [e for e in extra if e["model"] in ("deit_small_patch16_224", "minilm")] or extra
    print_report(rows, largest)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python -m bench.deploy " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "onnxruntime": ort.__version__, "cpu_int8": int8_flags(),
            "s8s8_exact": s8s8_is_exact(), "rows": rows,
            "models": extra, "targets": [{"target": n, "pass": ok, "value": v}
                                         for n, ok, v in targets(rows)]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
