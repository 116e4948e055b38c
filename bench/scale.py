"""Real-size workloads (issue "Real-size workloads"): ViTs at 224² on this machine's 2 cores.

    python -m bench.scale [--json out/scale.json] [--models deit_tiny_patch16_224,...]
                          [--images 10000] [--root DIR] [--skip-timing] [--skip-service]

Random weights throughout (nothing can be downloaded here; timing and memory do not depend on
the weights). One generated ImageFolder (``bench.imagefolder``: 100 classes, 4 training images
each for calibration and validation, ``--images`` test images), written once under ``--root``.

1. **Timing**, per model, 2 torch threads: FP32 forward of the 32 calibration images,
   calibration seconds (W8A8; full and integer settings), seconds per search candidate (a
   candidate lowers one quantizer; incremental recalibration plus scoring on 256 streamed
   validation images; median of 3), evaluation throughput of the FP32 and the quantized model
   (images per second over 256 streamed test images), and the extrapolated time of a full
   greedy search at the 4.5-bit budget. Printed beside the parameter count, with how each figure
   grows with it (the log-log slope between models).
2. **Service memory**: ``tsptq serve`` runs a ``deit_small_patch16_224`` job on the folder
   (greedy, ``max_candidates`` 2) with ``test_limit`` 1,000 and then with every test image;
   the peak resident memory of the dispatcher, of its DataLoader workers and of each Ray
   worker, sampled every 0.5 s, and the ratio between the two runs (constant memory: the test
   images are streamed). A DataLoader worker's RSS counts the pages it shares with the
   dispatcher it was forked from; its USS (unique pages) is what it holds of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from quant import Calibrator, QuantConfig
from quant.evaluate import logits_of
from quant.zoo.data import image_folder_data
from quant.zoo.models import load_model
from search.objective import Objective
from search.space import Candidate, SearchSpace
from search.strategies import SEARCH_KINDS, WIDTHS

from .imagefolder import FolderSpec, write_image_folder

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224")
THREADS = 2
CALIB = 32
VAL = 256


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def greedy_candidates(space: SearchSpace) -> dict:
    """How many candidates a greedy search to 4.5 bits scores: exactly ``1 + probes`` for its
    one-shot sensitivities (every searched quantizer at every lower width), then two per step;
    each step lowers one quantizer one width, so at most ``3 × quantizers`` steps (8→6→5→4).
    That upper bound is what is extrapolated; on the digits ViT it is compared with a real run
    (BENCHMARKS.md)."""
    slots = [s for s in space.slots.values() if s.kind in SEARCH_KINDS]
    probes = sum(1 for s in slots for w in WIDTHS if w < s.bits)
    steps = sum(sum(1 for w in WIDTHS if w < s.bits) for s in slots)
    return {"quantizers": len(slots), "probes": probes, "max_steps": steps,
            "candidates_at_most": 1 + probes + 2 * steps}


def time_model(name: str, data_root: Path, calib: int = CALIB, val: int = VAL,
               **model_kwargs) -> dict:
    """The timing row of one model (random weights; ``model_kwargs`` shrink it in tests)."""
    torch.manual_seed(0)
    model = load_model(name, "random", **model_kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    data = image_folder_data(data_root, model, calib, seed=0, limit=val, val_size=val)
    _, forward_s = _timed(lambda: logits_of(model, data.calib, batch=calib))
    row: dict = {"model": name, "params_m": round(params / 1e6, 3),
                 "forward_32_s": round(forward_s, 2)}
    calibrator = Calibrator(model, data.calib, QuantConfig())
    base = QuantConfig()
    qmodel, calib_s = _timed(lambda: calibrator.calibrate(base))
    row["calibration_full_s"] = round(calib_s, 2)
    _, int_s = _timed(lambda: Calibrator(model, data.calib, QuantConfig(setting="integer"))
                      .calibrate(QuantConfig(setting="integer")))
    row["calibration_integer_s"] = round(int_s, 2)
    space = SearchSpace.from_model(qmodel, data.calib)
    objective = Objective(model, calibrator, data.x_val, base)
    slots = [s for s in space.slots.values() if s.kind in SEARCH_KINDS]
    per_candidate = []
    for slot in slots[:3]:
        _, s = _timed(lambda slot=slot: objective(Candidate.make({slot.name: 6})))
        per_candidate.append(s)
    row["s_per_candidate"] = round(statistics.median(per_candidate), 3)
    fp_logits, fp_s = _timed(lambda: logits_of(model, data.x_test))
    qmodel = calibrator.calibrate(base)  # the scored candidates changed the shared model back
    _, q_s = _timed(lambda: logits_of(qmodel, data.x_test))
    n = len(fp_logits)
    row["fp32_images_per_s"] = round(n / fp_s, 1)
    row["quantized_images_per_s"] = round(n / q_s, 1)
    greedy = greedy_candidates(space)
    row.update(greedy)
    hours = greedy["candidates_at_most"] * row["s_per_candidate"] / 3600
    row["greedy_4p5_hours_1_worker_at_most"] = round(hours, 1)
    print(f"  {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def _slope(rows: list[dict], key: str) -> float | None:
    """d log(key) / d log(params) between the smallest and the largest model."""
    a, b = rows[0], rows[-1]
    if len(rows) < 2 or not a.get(key) or not b.get(key) or a["params_m"] == b["params_m"]:
        return None
    return round(math.log(b[key] / a[key]) / math.log(b["params_m"] / a["params_m"]), 2)


# ----------------------------------------------------------------------------- service memory


class PeakRss:
    """Peak resident memory per role among a process tree, sampled in a thread."""

    def __init__(self, root_pid: int, interval_s: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(root_pid)
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}   # role → peak RSS of one process of that role
        self.roles: dict[int, str] = {}   # pid → role, once known (a command line is costly)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def role(self, proc) -> str | None:
        cmd = " ".join(proc.cmdline())
        if "CandidateEvaluator" in cmd:
            return "ray_worker"
        if "service.cli worker" in cmd:
            # the server starts the dispatcher; its DataLoader workers are forked from it (the
            # same command line, another parent)
            return "dispatcher" if proc.ppid() == self.root.pid else "data_loader_worker"
        return None

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                for p in self.root.children(recursive=True):
                    try:
                        role = self.roles.get(p.pid) or self.role(p)
                        if role is not None:
                            self.roles[p.pid] = role
                            key = role if role != "ray_worker" else f"ray_worker_{p.pid}"
                            if role == "data_loader_worker":
                                # a forked worker's RSS counts the pages it shares with the
                                # dispatcher; its USS is what it holds of its own
                                info = p.memory_full_info()
                                self._peak("data_loader_worker_uss", info.uss)
                                rss = info.rss
                            else:
                                rss = p.memory_info().rss
                            self._peak(key, rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            except psutil.NoSuchProcess:
                return
            self.stop.wait(self.interval_s)

    def _peak(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks.get(key, 0), value)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        workers = sorted(v for k, v in self.peaks.items() if k.startswith("ray_worker_"))
        mb = 1 << 20
        return {"dispatcher_mb": round(self.peaks.get("dispatcher", 0) / mb),
                "data_loader_worker_mb": round(self.peaks.get("data_loader_worker", 0) / mb),
                "data_loader_worker_uss_mb": round(
                    self.peaks.get("data_loader_worker_uss", 0) / mb),
                "ray_workers_mb": [round(w / mb) for w in workers]}


def service_memory(root: Path, test_limits: list[int | None]) -> list[dict]:
    from service.client import ServiceClient
    from service.demo import free_port, start_server, stop_server, wait_healthy

    rows = []
    for limit in test_limits:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            port = free_port()
            env = {**os.environ, "TSPTQ_DATA_DIR": str(tmp / "data"), "HF_HUB_OFFLINE": "1",
                   "TSPTQ_DATA_ROOTS": json.dumps([str(root.resolve().parent)]),
                   "TSPTQ_TORCH_THREADS": str(THREADS), "TSPTQ_RAY_WORKERS": "1"}
            proc = start_server(port, env, tmp / "server.log")
            client = ServiceClient(f"http://127.0.0.1:{port}", timeout=60)
            try:
                wait_healthy(client, proc)
                job = {"model": "deit_small_patch16_224", "weights": "random",
                       "data": {"source": root.resolve().name, "calib_size": CALIB,
                                "val_size": VAL,
                                "test_limit": limit},
                       "search": {"strategy": "greedy", "budget_weight_bits": 6,
                                  "max_candidates": 2}}
                with PeakRss(proc.pid) as peaks:
                    job = client.submit(job)
                    job = client.wait(job["id"], poll_s=2, timeout_s=6 * 3600)
                if job["status"] != "succeeded":
                    raise RuntimeError(f"the job failed: {job['error']}")
                listing = client.artifacts(job["id"])
                ckpt = next(a for a in listing if a["kind"] == "checkpoint")
                served = client.download(ckpt, tmp).stat().st_size == ckpt["size"]
                report = json.loads(client.download(
                    next(a for a in listing if a["kind"] == "report"), tmp).read_text())
            finally:
                client.close()
                stop_server(proc)
            result = job["result"]
            test = report["samples"]["test"]
            row = {"test_images": report["test_images"], "classes": test["classes"],
                   "per_class": test["per_class"], **peaks.summary(),
                   "job_s": round(job["timings"]["total_s"], 1) if job.get("timings") else None,
                   "top1": result["top1"], "onnx_top1": result["onnx"].get("top1"),
                   "checkpoint_served": served}
            print(f"  service job: {json.dumps(row)}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True))
            + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--images", type=int, default=10_000, help="test images (100 classes)")
    p.add_argument("--root", type=Path, help="where the folder is written (default: a "
                   "directory under the system's temporary directory, kept for the next run)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--service-limits", default="1000,all",
                   help="the service job's test_limit per run, in order (all: every image)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.images < 1000 or args.images % 100:
        print("bench.scale: --images must be a multiple of 100, at least 1000", file=sys.stderr)
        return 2
    torch.set_num_threads(THREADS)
    spec = FolderSpec(classes=100, train_per_class=(CALIB + VAL) // 100 + 1,
                      val_per_class=args.images // 100)
    root = args.root or Path(tempfile.gettempdir()) / f"tsptq-scale-{spec.images}"
    _, write_s = _timed(lambda: write_image_folder(root, spec))
    print(f"image folder: {root} ({spec.images} images of {spec.size}², written or reused in "
          f"{write_s:.0f} s)", flush=True)
    report: dict = {"threads": THREADS, "folder": str(root), "test_images": args.images}
    if not args.skip_timing:
        rows = [time_model(m, root) for m in args.models.split(",")]
        report["timing"] = rows
        print("\n## Timing at 224² (random weights, 2 threads)\n")
        print(table(rows, ["model", "params_m", "forward_32_s", "calibration_full_s",
                           "calibration_integer_s", "s_per_candidate", "fp32_images_per_s",
                           "quantized_images_per_s", "quantizers", "candidates_at_most",
                           "greedy_4p5_hours_1_worker_at_most"]))
        growth = {k: _slope(rows, k) for k in ("forward_32_s", "calibration_full_s",
                                               "calibration_integer_s", "s_per_candidate")}
        report["growth_with_params"] = growth
        print("\nGrowth with the parameter count (d log figure / d log params, smallest to "
              f"largest model): {growth}")
    if not args.skip_service:
        limits = [None if v == "all" else int(v) for v in args.service_limits.split(",")]
        rows = service_memory(root, limits)
        report["service"] = rows
        small = min(rows, key=lambda r: r["test_images"])
        full = max(rows, key=lambda r: r["test_images"])
        ratios = {"dispatcher": round(full["dispatcher_mb"] / small["dispatcher_mb"], 2),
                  "data_loader_worker": round(full["data_loader_worker_mb"]
                                              / max(small["data_loader_worker_mb"], 1), 2),
                  "data_loader_worker_uss": round(full["data_loader_worker_uss_mb"]
                                                  / max(small["data_loader_worker_uss_mb"], 1),
                                                  2),
                  "ray_workers": round(max(full["ray_workers_mb"], default=0)
                                       / max(max(small["ray_workers_mb"], default=1), 1), 2)}
        report["memory_ratio_most_to_fewest_images"] = ratios
        print("\n## Service job on deit_small_patch16_224: peak resident memory (MB)\n")
        print(table(rows, ["test_images", "classes", "per_class", "dispatcher_mb",
                           "data_loader_worker_mb", "data_loader_worker_uss_mb",
                           "ray_workers_mb", "job_s", "top1", "onnx_top1",
                           "checkpoint_served"]))
        print(f"\nPeak memory, {full['test_images']} test images against "
              f"{small['test_images']}: {ratios}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
