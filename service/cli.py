"""The ``tsptq`` command line.

    tsptq demo                      the README's main job over HTTP (serve, submit, download)
    tsptq serve [--api-only]        API + a dispatcher + a local Ray (SQLite by default)
    tsptq worker                    a dispatcher alone (RAY_ADDRESS names a cluster)
    tsptq db upgrade|downgrade      Alembic migrations of TSPTQ_DATABASE_URL (or SQLite)
    tsptq submit|status|cancel|download|gate   clients of a running service (TSPTQ_URL)
    tsptq quantize                  the library alone, no service
    tsptq export CKPT --format onnx [--form auto|integer|qdq] --out FILE   a checkpoint as ONNX
                                    (--operands s8s8: the fast graph for CPUs with VNNI)

``quantize`` loads the model (the bundled digits ViT by default), calibrates every method at
every width with a progress bar, prints the accuracy table, saves the first method's checkpoint
at the first width, reloads it and checks that the reloaded model reproduces the calibrated one
exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


def _widths(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            w, a = part.split("/")
            out.append((int(w), int(a)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad width {part!r}: write W/A pairs such as 8/8,4/4") from None
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from quant import METHODS, QuantConfig, load_quantized, quantize, save_quantized
    from quant.evaluate import compare, logits_of
    from quant.zoo.data import digits_data, image_folder_data
    from quant.zoo.models import load_model

    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"tsptq: unknown method(s) {bad}; choose from {list(METHODS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        configs = [QuantConfig(method=m, w_bits=w, a_bits=a, setting=args.setting)
                   for (w, a) in args.widths for m in methods]
        model = load_model(args.model, args.weights)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"tsptq: {e}", file=sys.stderr)
        return EXIT_USAGE
    model.eval()
    data = digits_data() if args.data is None else image_folder_data(args.data, model)
    fp_logits = logits_of(model, data.x_test)
    rows = []
    first = None
    for cfg in tqdm(configs, desc="calibrating", unit="config", file=sys.stderr):
        qmodel = quantize(model, data.calib, cfg)
        res = compare(fp_logits, logits_of(qmodel, data.x_test), data.y_test)
        rows.append((cfg, res, qmodel.info["calib_seconds"]))
        if first is None:
            first = (qmodel, res)
    print(f"\n{args.model}: {len(data.y_test)} test images, {len(data.calib)} calibration images")
    print(f"{'method':8} {'setting':8} {'W/A':5} {'top-1':>7} {'FP32':>7} {'agree':>7} "
          f"{'KL':>9} {'calib s':>8}")
    for cfg, res, secs in rows:
        print(f"{cfg.method:8} {cfg.setting:8} {cfg.w_bits}/{cfg.a_bits:<3} {res.top1:7.2%} "
              f"{res.fp32_top1:7.2%} {res.agreement:7.2%} {res.kl:9.2e} {secs:8.1f}")
    qmodel, res = first
    out = Path(args.out or f"out/{args.model}_{qmodel.config.method}_w{qmodel.config.w_bits}"
                           f"a{qmodel.config.a_bits}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(qmodel, out, metrics=res.to_dict())
    reloaded = load_quantized(out)
    same = torch.equal(logits_of(reloaded, data.x_test), logits_of(qmodel, data.x_test))
    print(f"\nsaved {out} ({out.stat().st_size / 1024:.0f} KiB); "
          f"reloaded model reproduces the calibrated one exactly: {same}")
    return 0 if same else 1


def cmd_export(args: argparse.Namespace) -> int:
    """The checkpoint as an ONNX model: its integer program (bit-identical in ONNX Runtime) or its
    fast QDQ graph (int8 matmuls fused by ONNX Runtime)."""
    try:
        from export import default_form, export_onnx
    except ImportError as e:  # onnx is a dependency; a broken environment still gets a message
        print(f"tsptq: ONNX export needs the onnx package: {e}", file=sys.stderr)
        return 1
    out = args.out or args.checkpoint.with_suffix(".onnx")
    try:
        form = default_form(args.checkpoint) if args.form == "auto" else args.form
        if form == "integer" and args.operands is not None:
            raise ValueError("--operands chooses the fast graph's int8 storage; this checkpoint "
                             "exports its integer graph (--form qdq for the fast graph)")
        path = export_onnx(args.checkpoint, out, form=form, operands=args.operands or "u8u8")
    except (ValueError, OSError) as e:  # CheckpointError, ExportError: a clear message, no trace
        print(f"tsptq: export failed: {e}", file=sys.stderr)
        return 1
    print(f"tsptq: wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {args.format}, "
          f"form {form})")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .db import downgrade, upgrade
    from .settings import get_settings

    url = get_settings().db_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    else:
        downgrade(url, args.revision or "base")
    print(f"tsptq: database {args.action}d ({_safe_url(url)})")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_worker(args: argparse.Namespace) -> int:
    """The dispatcher alone: claims queued jobs and runs them on Ray until SIGTERM or SIGINT
    (or, with ``--exit-with-parent``, until its parent process is gone); a job running then is
    handed back to the queue, and the Ray processes this dispatcher started stop with it."""
    import signal
    import threading

    from .dispatcher import Dispatcher
    from .settings import get_settings
    from .store import Store

    _logging(args.log_level)
    settings = get_settings()
    import torch

    # The dispatcher's own work (statistics, artifacts) runs beside Ray actors that take a core
    # each; torch's default pool on every core would oversubscribe them and run many times
    # slower (measured: ~20 s instead of ~0.2 s for a tiny calibration on a busy machine).
    torch.set_num_threads(settings.torch_threads)
    if args.migrate:
        from .db import upgrade

        upgrade(settings.db_url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_with_parent:
        _stop_when_orphaned(stop)
    store = Store.from_url(settings.db_url, chunk_bytes=settings.chunk_bytes)
    try:
        Dispatcher(store, settings).run_forever(stop, poll_s=args.poll)
    finally:
        _shutdown_ray()
        store.engine.dispose()
    return 0


def _stop_when_orphaned(stop, poll_s: float = 0.5) -> None:
    """Set ``stop`` once this process's parent is gone (it was re-parented): a ``tsptq serve``
    killed with SIGKILL runs no cleanup of its own, and its dispatcher must not keep claiming
    jobs as an orphan."""
    import logging
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                logging.getLogger("tsptq.worker").warning("parent %d is gone; stopping", parent)
                stop.set()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _shutdown_ray() -> None:
    """Stop the Ray this process started (a local ``ray.init()`` starts its own GCS, raylet and
    workers; a connection to a cluster only disconnects)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _server(config):
    """uvicorn's server, stopped by SIGTERM or SIGINT without re-raising the signal afterwards
    (uvicorn does, which kills this process by SIGTERM before it can stop its dispatcher).
    ``stopped_by``: the signal that stopped it, if one did."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        def _stop(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: do not wait for open connections
            self.stopped_by = sig
            self.should_exit = True

    return Server(config)


def cmd_serve(args: argparse.Namespace) -> int:
    """API in this process, plus (unless --api-only) one dispatcher as a child process: either
    can be killed and restarted without the other losing work. SIGTERM or SIGINT stops both
    (the dispatcher hands a running job back to the queue) and exits 0; killed with SIGKILL,
    its dispatcher notices it is orphaned and stops too."""
    import os
    import subprocess

    import uvicorn

    from .db import upgrade
    from .settings import get_settings

    _logging(args.log_level)
    settings = get_settings()
    upgrade(settings.db_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for root in settings.data_roots:
        if not root.exists() and root.is_relative_to(settings.data_dir):
            root.mkdir(parents=True, exist_ok=True)
    child = None
    if not args.api_only:
        child = subprocess.Popen([sys.executable, "-m", "service.cli", "worker",
                                  "--exit-with-parent", "--log-level", args.log_level],
                                 env=os.environ.copy())
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    print(f"tsptq: serving on http://{host}:{port} (database {_safe_url(settings.db_url)}; "
          f"dispatcher {'pid ' + str(child.pid) if child else 'not started'})", flush=True)
    server = _server(uvicorn.Config("api.app:serve_app", factory=True, host=host, port=port,
                                    log_level=args.log_level.lower(), access_log=False))
    try:
        server.run()
    finally:
        if child is not None:
            _stop_child(child)
    if server.stopped_by is not None:
        print(f"tsptq: stopped by signal {server.stopped_by}", flush=True)
    return 0


def _stop_child(child, timeout_s: float = 60) -> None:
    """SIGTERM the dispatcher (it hands its job back and stops its Ray), SIGKILL it if it is
    still there after ``timeout_s``."""
    import subprocess

    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsptq", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model with the library, no service")
    q.add_argument("--model", default="digits_vit", help="timm model name (default: digits_vit)")
    q.add_argument("--weights", default="pretrained",
                   help="pretrained (default; the bundled file for digits_vit), random, or a "
                        "local .safetensors/.pth file")
    q.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/")
    q.add_argument("--methods", default="tsptq,uniform,twin,ptf")
    q.add_argument("--widths", type=_widths, default=_widths("8/8,6/6,4/4"))
    q.add_argument("--setting", default="full", choices=("full", "partial", "integer"))
    q.add_argument("--out", help="checkpoint path of the first method at the first width")
    q.set_defaults(func=cmd_quantize)

    ex = sub.add_parser("export", help="export a checkpoint as ONNX: the integer graph "
                        "(bit-identical to the integer engine) or the fast QDQ graph")
    ex.add_argument("checkpoint", type=Path, help="a tsptq checkpoint")
    ex.add_argument("--format", default="onnx", choices=("onnx",))
    ex.add_argument("--form", default="auto", choices=("auto", "integer", "qdq"),
                    help="integer: the integer program, bit-identical to the engine; qdq: the "
                    "fast graph (int8 matmuls in ONNX Runtime); auto (default): integer where "
                    "the checkpoint has an integer program, else qdq")
    ex.add_argument("--operands", choices=("u8u8", "s8s8"),
                    help="the fast graph's int8 grids: u8u8 (default), exact in ONNX Runtime on "
                    "every CPU; s8s8, faster where the CPU has VNNI (and on ARM), but inexact "
                    "on x86 without VNNI (saturating int16 sums)")
    ex.add_argument("--out", type=Path, help="output file (default: the checkpoint's path with "
                                             ".onnx)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="the API, a dispatcher and a local Ray (the embedded "
                        "default: SQLite under TSPTQ_DATA_DIR)")
    sv.add_argument("--host", help="default: TSPTQ_HOST or 127.0.0.1")
    sv.add_argument("--port", type=int, help="default: TSPTQ_PORT or 8000")
    sv.add_argument("--api-only", action="store_true",
                    help="no dispatcher (run `tsptq worker` elsewhere)")
    sv.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    sv.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="a dispatcher alone: runs queued jobs on Ray (a local "
                       "Ray, or the cluster named by RAY_ADDRESS)")
    w.add_argument("--poll", type=float, default=1.0, help="seconds between polls when idle")
    w.add_argument("--migrate", action="store_true", help="upgrade the database first")
    w.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the parent process is gone (how `tsptq serve` runs it)")
    w.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    w.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database migrations (TSPTQ_DATABASE_URL, or SQLite)")
    db.add_argument("action", choices=("upgrade", "downgrade"))
    db.add_argument("revision", nargs="?", help="default: head (upgrade), base (downgrade)")
    db.set_defaults(func=cmd_db)

    from . import demo
    from .cli_client import register

    register(sub)
    demo.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"tsptq: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
