"""Candidate evaluation on Ray.

A job's model, validation images and calibration statistics (a ``Calibrator``) are put in the
object store once; each worker is an actor that loads them once and then scores any number of
candidates (each call one Ray task). Scores do not depend on which worker computes them: a
calibration is a pure function of the statistics and the candidate, so a result does not depend
on the number of workers either.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
import torch
from torch import Tensor, nn

from quant import Calibrator, QuantConfig
from search.objective import Objective, Score
from search.space import Candidate
from search.strategies import SearchCancelled


@dataclass
class JobContext:
    """Everything a worker needs, shipped once per job."""

    model: nn.Module
    calibrator: Calibrator
    val_images: Tensor
    base: QuantConfig


@ray.remote(max_restarts=2, max_task_retries=2)
class CandidateEvaluator:
    def __init__(self, context: JobContext, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ctx = context
        if device == "cuda":
            ctx.model = ctx.model.to(device)
        self.objective = Objective(ctx.model, ctx.calibrator, ctx.val_images, ctx.base)
        self.pid = os.getpid()

    def score(self, candidate: dict, shared: list[dict] = ()) -> tuple[float, float, dict]:
        """``shared``: module calibrations the other workers searched since this one's last
        task; returned: the ones this task searched, for the others."""
        calibrator = self.objective.calibrator
        for calibrations in shared:
            calibrator.import_calibrations(calibrations)
        s = self.objective(Candidate.from_dict(candidate))
        return s.kl, s.agreement, calibrator.export_calibrations()

    def ping(self) -> int:
        return self.pid


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray.

    Ray's core worker installs a failure signal handler for SIGTERM that logs and ends the
    process at once; a process that handles SIGTERM itself (a dispatcher hands its job back
    and stops its Ray in order) gets its own handler back."""
    if not ray.is_initialized():
        own = signal.getsignal(signal.SIGTERM)
        address = os.environ.get("RAY_ADDRESS")
        if address:  # a cluster's resources are its own: num_cpus applies to a local Ray only
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        if callable(own) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, own)


class EvaluatorPool:
    """``pool.map(candidates)`` scores candidates on ``workers`` actors, one task per actor in
    flight (``ray.wait`` hands the next candidate to whichever finishes); ``cancel`` (or a
    ``cancelled()`` callable returning True) stops it and cancels the tasks in flight."""

    def __init__(self, context: JobContext, workers: int,
                 cancelled: Callable[[], bool] | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        ensure_ray()
        self.context_ref = ray.put(context)  # held: restarted actors re-read it
        gpus = 1 if torch.cuda.is_available() else 0
        self.actors = [CandidateEvaluator.options(num_gpus=gpus).remote(self.context_ref)
                       for _ in range(workers)]
        self._cancel = False
        self._cancelled = cancelled
        # Per actor, the module calibrations the other actors searched since its last task. A
        # calibration is a pure function of the shared statistics and the module's widths and
        # pins, so handing them on changes no score; it saves each actor repeating the searches
        # another made (a greedy step's accepted layer, a probe revisited): with 2 workers the
        # actors spent ~30% more per candidate than 1 worker without it.
        self._inbox: list[list[dict]] = [[] for _ in range(workers)]

    @property
    def cancelled(self) -> bool:
        return self._cancel or (self._cancelled is not None and self._cancelled())

    def map(self, candidates: Sequence[Candidate],
            done: Callable[[int, Score], None] | None = None) -> list[Score]:
        results: list[Score | None] = [None] * len(candidates)
        pending: dict = {}
        idle = list(range(len(self.actors)))
        queue = list(enumerate(candidates))
        while queue or pending:
            if self.cancelled:
                for ref in pending:
                    ray.cancel(ref)
                raise SearchCancelled("search cancelled")
            while queue and idle:
                i, cand = queue.pop(0)
                a = idle.pop(0)
                shared, self._inbox[a] = self._inbox[a], []
                pending[self.actors[a].score.remote(cand.to_dict(), shared)] = (i, a)
            # A timeout, so that a cancel is seen while a long candidate runs.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i, a = pending.pop(ref)
                kl, agreement, searched = ray.get(ref)
                results[i] = Score(kl=kl, agreement=agreement)
                if searched["items"]:
                    for other, inbox in enumerate(self._inbox):
                        if other != a:
                            inbox.append(searched)
                idle.append(a)
                if done is not None:
                    done(i, results[i])
        return results  # type: ignore[return-value]

    def __call__(self, candidate: Candidate) -> Score:
        return self.map([candidate])[0]

    def cancel(self) -> None:
        self._cancel = True

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
