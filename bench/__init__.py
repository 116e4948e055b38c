"""Benchmarks (``python -m bench.<name>``). Imported before any of them starts Ray: every Ray
node a benchmark starts (and those of its subprocesses) listens on 127.0.0.1 only. Never set
this in a deployment."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
