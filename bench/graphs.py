"""ONNX files of one model side by side: their latency in ONNX Runtime, alternated in blocks of
runs (medians), and whether their outputs are identical. For the effect of an exporter change, which
two separate runs of ``bench.deploy`` cannot resolve on a shared machine (their FP32 rows alone
move by ±15%): export one checkpoint with both versions, then

    python -m bench.graphs before.onnx after.onnx --batch 8 --threads 2 --json out/graphs.json

Inputs are random: images (N, 3, H, W) from the first file's input shape (``--size`` where it
is dynamic, 224); token ids below 1000 with every token real for a text encoder (``--tokens``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def random_feed(sess: ort.InferenceSession, batch: int, tokens: int, size: int,
                seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        if i.type == "tensor(int64)":  # a text encoder's ids, mask and token types
            shape = (batch, tokens)
            feed[i.name] = (np.ones(shape, np.int64) if "mask" in i.name else
                            np.zeros(shape, np.int64) if "type" in i.name else
                            rng.integers(0, 1000, shape, dtype=np.int64))
        else:
            dims = [d if isinstance(d, int) else size for d in i.shape[1:]]
            feed[i.name] = rng.standard_normal((batch, *dims)).astype(np.float32)
    return feed


def compare(paths: list[Path], batch: int, threads: int, tokens: int, size: int, warmup: int,
            repeats: int, block: int = 5) -> list[dict]:
    """Median latency of each file over ``repeats`` timed runs, taken in blocks of ``block``
    runs that alternate between the files (each block after one untimed run). Alternating run
    by run measures the switch instead: a session's intra-op threads still spin for work after
    its run, and the next session's run shares the cores with them (a 5-node Add-GELU graph on
    (8, 197, 1536) took 10.5 ms a run alternated with four other sessions on two threads, 2.5 ms
    in blocks, on a 2-core VM)."""
    sessions = [session(p, threads) for p in paths]
    feed = random_feed(sessions[0], batch, tokens, size)
    outs = [s.run(None, feed) for s in sessions]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    while len(times[-1]) < repeats:  # a slow spell of the machine hits every file alike
        for s, t in zip(sessions, times, strict=True):
            s.run(None, feed)
            for _ in range(min(block, repeats - len(t))):
                start = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - start)
    first = statistics.median(times[0])
    return [{"file": str(p), "batch": batch, "threads": threads,
             "latency_ms": round(1e3 * statistics.median(t), 3),
             "min_ms": round(1e3 * min(t), 3),
             "vs_first": round(first / statistics.median(t), 3),
             "size_bytes": p.stat().st_size,
             "identical_to_first": all(np.array_equal(a, b) for a, b in zip(o, outs[0],
                                                                            strict=True))}
            for p, t, o in zip(paths, times, outs, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--size", type=int, default=224, help="image side where it is dynamic")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per file")
    ap.add_argument("--block", type=int, default=5, help="timed runs per turn of a file")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = []
    for threads in args.threads:
        for batch in args.batch:
            for r in compare(args.files, batch, threads, args.tokens, args.size, args.warmup,
                             args.repeats, args.block):
                rows.append(r)
                print(f"b{batch} t{threads}  {r['latency_ms']:9.2f} ms (min {r['min_ms']:.2f})  "
                      f"×{r['vs_first']:.3f} "
                      f"vs the first  {'identical' if r['identical_to_first'] else 'DIFFERENT'}"
                      f"  {r['file']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
