"""Accuracy benchmark: every method × setting × width on the digits ViT's held-out split.

    python -m bench.accuracy --json out/accuracy.json

Prints (1) top-1, agreement with FP32, KL and calibration seconds (one thread) per row,
(2) SQNR in dB per tensor kind and method on the test split's real activations (fully quantized),
(3) calibration seconds of timm ``deit_tiny_patch16_224`` (random weights) at 224×224 with
32 images, per method, and (4) the issue's targets, each PASS or FAIL.

With ``--model NAME --weights pretrained|FILE --data DIR`` the same benchmark runs on any
supported timm model and an ImageFolder directory (DIR/train for calibration, DIR/val for
evaluation), e.g. ImageNet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from quant import QuantConfig, quantize
from quant.evaluate import compare, logits_of
from quant.zoo.data import EvalData, digits_data, image_folder_data
from quant.zoo.models import load_model

METHODS = ("uniform", "twin", "ptf", "tsptq")
SETTINGS = ("full", "partial")
WIDTHS = ((8, 8), (6, 6), (4, 8), (4, 4))
SQNR_KINDS = ("post_softmax", "post_gelu", "ln_input", "linear_input", "weight")
ABLATION_COLUMNS = ("w_bits", "a_bits", "top1", "agreement", "kl")
# Each a change to tsptq's default config (or to a baseline), fully quantized.
ABLATIONS = (
    ("tsptq (V-2SF + O-2SF, defaults)", {}),
    ("tsptq + V-2SF coarse offset", {"coarse_offset": True}),
    ("tsptq + O-2SF on post-LN (qkv, fc1 inputs)", {"post_ln_two_scale": True}),
    ("tsptq + RepQ-ViT reparameterized post-LN", {"post_ln_reparam": True}),
    ("tsptq + class token's own input quantizers", {"first_token_scale": True}),
    ("tsptq, sorted-split outlier rule", {"outlier_rule": "sorted_split"}),
    ("tsptq, MSE metric", {"metric": "mse"}),
    ("tsptq, cosine metric", {"metric": "cosine"}),
    ("tsptq, one shared LN zero point", {"channel_zero_points": False}),
    ("ptf + per-channel LN zero points", {"method": "ptf", "channel_zero_points": True}),
)


def measure(model: torch.nn.Module, data: EvalData, fp_logits: torch.Tensor,
            cfg: QuantConfig) -> tuple[dict, dict[str, float]]:
    """Quantize under ``cfg``; its accuracy row and its SQNR (dB) per tensor kind."""
    start = time.perf_counter()
    qmodel = quantize(model, data.calib, cfg)
    calib_s = time.perf_counter() - start
    with qmodel.probe_sqnr() as read:
        res = compare(fp_logits, logits_of(qmodel, data.x_test), data.y_test)
    row = {"w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "top1": round(res.top1, 4),
           "fp32_top1": round(res.fp32_top1, 4), "agreement": round(res.agreement, 4),
           "kl": float(f"{res.kl:.3g}"), "calib_s": round(calib_s, 2)}
    return row, {k: round(v, 2) for k, v in read().items()}


def run_grid(model: torch.nn.Module, data: EvalData, fp_logits: torch.Tensor,
             metric: str) -> tuple[list[dict], list[dict]]:
    rows, sqnr_rows = [], []
    grid = [(m, s, w) for s in SETTINGS for w in WIDTHS for m in METHODS]
    for method, setting, (wb, ab) in tqdm(grid, desc="methods", file=sys.stderr):
        cfg = QuantConfig(method=method, setting=setting, w_bits=wb, a_bits=ab, metric=metric)
        row, sqnr = measure(model, data, fp_logits, cfg)
        rows.append({"method": method, "setting": setting, **row})
        if setting == "full":
            sqnr_rows.append({"method": method, "w_bits": wb, "a_bits": ab,
                              **{k: sqnr.get(k, float("nan")) for k in SQNR_KINDS}})
    return rows, sqnr_rows


def run_ablations(model: torch.nn.Module, data: EvalData, fp_logits: torch.Tensor,
                  metric: str) -> list[dict]:
    rows = []
    grid = [(a, w) for a in ABLATIONS for w in WIDTHS]
    for (name, change), (wb, ab) in tqdm(grid, desc="ablations", file=sys.stderr):
        cfg = QuantConfig(**{"metric": metric, "w_bits": wb, "a_bits": ab, **change})
        row, sqnr = measure(model, data, fp_logits, cfg)
        rows.append({"variant": name, **{k: row[k] for k in ABLATION_COLUMNS},
                     **{f"{k}_sqnr": sqnr[k] for k in SQNR_KINDS[:4]}})
    return rows


def deit_calibration_seconds(device: str) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval().to(device)
    images = torch.randn(32, 3, 224, 224)
    out = []
    for method in METHODS:
        start = time.perf_counter()
        quantize(model, images, QuantConfig(method=method))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append({"model": "deit_tiny_patch16_224", "method": method,
                    "calib_s": round(time.perf_counter() - start, 1)})
    return out


def print_targets(checks: list[tuple[str, bool]]) -> None:
    print("\n## Targets\n")
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def write_json(path: Path, out: dict, checks: list[tuple[str, bool]]) -> None:
    """The benchmark's rows and its targets, each with its verdict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**out, "targets": [{"target": n, "pass": ok} for n, ok in checks]}
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]

    def line(vals: list) -> str:
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line([r[c] for c in cols]) for r in rows)])


def check_targets(rows: list[dict], sqnr_rows: list[dict]) -> list[tuple[str, bool]]:
    """The issue's targets, on the fully quantized rows."""
    full = [r for r in rows if r["setting"] == "full"]

    def get(m: str, w: int, a: int) -> dict:
        return next(r for r in full if (r["method"], r["w_bits"], r["a_bits"]) == (m, w, a))

    t88, t66, t44 = get("tsptq", 8, 8), get("tsptq", 6, 6), get("tsptq", 4, 4)
    checks = [
        ("tsptq W8A8 within 0.3 points of FP32",
         t88["fp32_top1"] - t88["top1"] <= 0.003 + 1e-9),
        ("tsptq W8A8 agreement >= 99.5%", t88["agreement"] >= 0.995),
        ("tsptq W6A6 within 1 point of FP32", t66["fp32_top1"] - t66["top1"] <= 0.01 + 1e-9),
        ("tsptq W4A4 top-1 >= 90%", t44["top1"] >= 0.90),
    ]
    for wb, ab in WIDTHS:
        t = get("tsptq", wb, ab)
        others = [get(m, wb, ab) for m in METHODS if m != "tsptq"]
        best = all((t["agreement"], -t["kl"]) >= (o["agreement"], -o["kl"]) for o in others)
        checks.append((f"W{wb}A{ab}: tsptq best by agreement, then KL", best))
        s = {r["method"]: r for r in sqnr_rows if (r["w_bits"], r["a_bits"]) == (wb, ab)}
        for kind in ("post_softmax", "post_gelu", "ln_input"):
            top = all(s["tsptq"][kind] >= s[m][kind] for m in METHODS if m != "tsptq")
            checks.append((f"W{wb}A{ab}: tsptq highest SQNR on {kind}", top))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--model", default="digits_vit", help="timm model name (default: digits_vit)")
    p.add_argument("--weights", default="pretrained",
                   help="pretrained (default), random, or a local .safetensors/.pth file")
    p.add_argument("--data", type=Path,
                   help="ImageFolder root with train/ and val/ (default: digits)")
    p.add_argument("--metric", default=QuantConfig().metric, choices=("mse", "cosine", "hessian"))
    p.add_argument("--skip-deit", action="store_true", help="skip the deit_tiny timing")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # calibration seconds are reported for one thread
    model = load_model(args.model, args.weights)
    data = digits_data() if args.data is None else image_folder_data(args.data, model)
    model = model.to(args.device)
    fp_logits = logits_of(model, data.x_test)
    rows, sqnr_rows = run_grid(model, data, fp_logits, args.metric)
    print(f"\n## Accuracy ({args.model}, {len(data.y_test)} test images, metric {args.metric})\n")
    print(table(rows, ["method", "setting", "w_bits", "a_bits", "top1", "fp32_top1", "agreement",
                       "kl", "calib_s"]))
    print("\n## SQNR (dB) per tensor kind, fully quantized, test split\n")
    print(table(sqnr_rows, ["method", "w_bits", "a_bits", *SQNR_KINDS]))
    ablations = run_ablations(model, data, fp_logits, args.metric)
    print("\n## Ablations (fully quantized)\n")
    print(table(ablations, ["variant", "w_bits", "a_bits", "top1", "agreement", "kl",
                            *(f"{k}_sqnr" for k in SQNR_KINDS[:4])]))
    deit = [] if args.skip_deit else deit_calibration_seconds(args.device)
    if deit:
        print("\n## Calibration seconds, deit_tiny_patch16_224 (random weights), 32 images, "
              f"224x224, W8A8 full, on {args.device} (one CPU thread)\n")
        print(table(deit, ["model", "method", "calib_s"]))
    checks = check_targets(rows, sqnr_rows) if args.data is None else []
    if checks:
        t88 = next(r for r in rows if (r["method"], r["setting"], r["w_bits"], r["a_bits"])
                   == ("tsptq", "full", 8, 8))
        checks.append(("tsptq W8A8 calibration <= 30 s (one thread)", t88["calib_s"] <= 30))
        print_targets(checks)
    if args.json:
        write_json(args.json, {"rows": rows, "sqnr": sqnr_rows, "ablations": ablations,
                               "deit_calibration": deit}, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
