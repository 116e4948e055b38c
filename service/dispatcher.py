"""The dispatcher: claims queued jobs from the store and runs them on Ray through ``workers``.

Any number of dispatchers may share one database (claims are atomic). While a job runs, a
heartbeat thread stamps it every ``heartbeat_s``; it also watches for a cancel request, and for
the loss of the job (requeued as stale and claimed by another dispatcher), and stops the Ray work
in either case. A dispatcher that dies stops heartbeating: after ``stale_after_s`` any dispatcher
requeues the job, and the next run reuses every candidate the first one stored; after
``max_attempts`` such claims the job is failed instead (it would take the next dispatcher down
too). A dispatcher asked to stop (``run_forever``'s event: SIGTERM or SIGINT to ``tsptq
worker``, or its ``tsptq serve`` parent gone) stops its job's Ray work and hands the job back to
the queue at once, without counting it as a failed attempt. So does one whose Ray cluster head
is lost (``RayUnavailable``): it leaves the cluster, claims nothing until the head answers again,
then joins it anew, and the job resumes from its stored candidates.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from quant import CheckpointError, QuantConfig
from quant.modules import UnsupportedModelError
from quant.zoo.models import check_supported
from search.objective import Score
from search.space import Candidate
from search.strategies import Budget, EvolutionSettings, SearchCancelled, StopCriteria
from workers.evaluator import RayUnavailable, disconnect_ray, head_reachable
from workers.jobs import JobHooks, JobInputs, run_job

from .jobspec import DIGITS, DataPathError, JobSpec, resolve_data_dir
from .settings import Settings
from .store import DatabaseUnavailable, Store, StoreError

log = logging.getLogger("tsptq.dispatcher")

# Errors whose message tells a user what to fix in the request; anything else is reported as an
# internal error with its type.
USER_ERRORS = (ValueError, FileNotFoundError, UnsupportedModelError, CheckpointError,
               DataPathError)


class JobLost(RuntimeError):
    """This dispatcher no longer owns the job (requeued as stale, or finished elsewhere)."""


class ArtifactsNotStored(RuntimeError):
    """The job's artifacts could not be written (none of them is stored)."""


def inputs_of(spec: JobSpec, settings: Settings, weights: str | Path, workers: int) -> JobInputs:
    q, s = spec.quant, spec.search
    data = DIGITS if spec.data.source == DIGITS else resolve_data_dir(spec.data.source,
                                                                       settings.data_roots)
    return JobInputs(
        model=spec.model, weights=weights, data=data, calib_size=spec.data.calib_size,
        val_size=spec.data.val_size, test_limit=spec.data.test_limit,
        config=QuantConfig(method=q.method, setting=q.setting, w_bits=q.w_bits,
                           a_bits=q.a_bits, seed=q.seed, calib_size=spec.data.calib_size,
                           weight_rounding=q.weight_rounding),
        strategy=s.strategy, budget=Budget(s.budget_weight_bits, s.budget_activation_bits,
                                                s.budget_weight_bytes, s.budget_bitops),
        stop=StopCriteria(s.max_candidates, s.time_budget_s, s.target_agreement),
        evolution=EvolutionSettings(population=s.population, generations=s.generations,
                                    seed=q.seed),
        workers=workers, plots=spec.artifacts.plots,
        onnx_operands=spec.artifacts.onnx_operands)


class Dispatcher:
    def __init__(self, store: Store, settings: Settings, worker_id: str | None = None) -> None:
        self.store, self.settings = store, settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()  # set: hand the running job back and stop
        self._waiting_for_head = False

    def run_forever(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Run jobs until ``stop`` is set; a job running then is handed back to the queue."""
        self.stopping = stop
        log.info("dispatcher %s started", self.worker_id)
        while not stop.is_set():
            try:
                if self.run_once() is None:
                    stop.wait(poll_s)
            except DatabaseUnavailable as e:
                log.warning("database unavailable (%s); retrying in %.0f s", e, 2 * poll_s)
                stop.wait(2 * poll_s)
        log.info("dispatcher %s stopped", self.worker_id)

    def run_once(self) -> str | None:
        """Fail jobs that crashed too many dispatchers, requeue other stale jobs, then claim and
        run one job; its id, or None if none was queued (or the Ray head is unreachable)."""
        if not self._ray_head_ready():
            return None
        for job_id in self.store.abandon_stale(self.settings.stale_after_s,
                                               self.settings.max_attempts):
            log.error("job %s: abandoned after %d attempts that each stopped its dispatcher",
                      job_id, self.settings.max_attempts)
        for job_id in self.store.requeue_stale(self.settings.stale_after_s):
            log.warning("job %s: its dispatcher stopped heartbeating; requeued", job_id)
        job = self.store.claim_next(self.worker_id)
        if job is None:
            return None
        log.info("job %s: claimed by %s (claim %d)", job.id, self.worker_id, job.claims)
        self.run(job.id, job.request)
        return job.id

    def _ray_head_ready(self) -> bool:
        """With a cluster (``RAY_ADDRESS``): whether its head answers. A lost head is left (a
        connection to it cannot come back) and waited for; jobs are claimed once it is back."""
        if not os.environ.get("RAY_ADDRESS") or head_reachable():
            if self._waiting_for_head:
                log.info("the Ray head at %s answers again", os.environ["RAY_ADDRESS"])
                self._waiting_for_head = False
            return True
        disconnect_ray()
        if not self._waiting_for_head:
            log.warning("the Ray head at %s is unreachable; claiming no job until it is back",
                        os.environ["RAY_ADDRESS"])
            self._waiting_for_head = True
        return False

    def run(self, job_id: str, request: dict) -> None:
        cancel = threading.Event()
        lost = threading.Event()
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, cancel, lost, beating),
                                daemon=True, name=f"heartbeat-{job_id[:8]}")
        beat.start()
        t0 = time.perf_counter()
        try:
            self._run(job_id, request, cancel, lost)
        except SearchCancelled:
            if lost.is_set():
                log.warning("job %s: lost to another dispatcher; dropped", job_id)
            elif cancel.is_set():
                self.store.mark_cancelled(job_id, self.worker_id)
                log.info("job %s: cancelled", job_id)
            elif self.store.release(job_id, self.worker_id):
                log.info("job %s: dispatcher stopping; requeued (its %d stored candidates are "
                         "kept)", job_id, self.store.candidate_count(job_id))
        except JobLost:
            log.warning("job %s: lost to another dispatcher; dropped", job_id)
        except RayUnavailable as e:
            self._hand_back_on_ray_loss(job_id, e)
        except ArtifactsNotStored as e:
            self.store.fail(job_id, str(e), {"total_s": round(time.perf_counter() - t0, 2)},
                            self.worker_id)
            log.error("job %s failed: %s", job_id, e)
        except USER_ERRORS as e:
            self.store.fail(job_id, f"{e}", {"total_s": round(time.perf_counter() - t0, 2)},
                            self.worker_id)
            log.info("job %s failed: %s", job_id, e)
        except Exception as e:
            if os.environ.get("RAY_ADDRESS") and not head_reachable():  # a Ray error of its loss
                self._hand_back_on_ray_loss(job_id, e)
                return
            log.exception("job %s: internal error", job_id)
            self.store.fail(job_id, f"internal error: {type(e).__name__}: {e}",
                            {"total_s": round(time.perf_counter() - t0, 2)}, self.worker_id)
        finally:
            beating.set()
            beat.join(timeout=5)

    def _run(self, job_id: str, request: dict, cancel: threading.Event,
             lost: threading.Event) -> None:
        spec = JobSpec.model_validate(request)
        check_supported(spec.model)  # before any weights are fetched
        store = self.store
        with tempfile.TemporaryDirectory(prefix=f"tsptq-{job_id[:8]}-") as tmp:
            tmp_dir = Path(tmp)
            weights: str | Path = spec.weights
            if spec.uploaded_model_id is not None:
                weights = store.write_model_to(spec.uploaded_model_id,
                                               tmp_dir / "weights.safetensors")
            inputs = inputs_of(spec, self.settings, weights, self.settings.ray_workers)
            known = {k: Score(kl, agr) for k, (kl, agr) in store.candidate_scores(job_id).items()}
            if known:
                log.info("job %s: resuming with %d candidates already scored", job_id, len(known))
            last = [0.0, ""]

            def progress(done: int, total: int, stage: str) -> None:
                now = time.monotonic()  # at most a few writes a second, every stage change
                if stage != last[1] or done >= total or now - last[0] > 0.5:
                    last[:] = [now, stage]
                    store.set_progress(job_id, done, total, stage)

            def on_scored(seq: int, cand: Candidate, score: Score, point: dict) -> None:
                costs = {k: point[k] for k in ("weight_bits", "activation_bits",
                                               "weight_bytes", "bitops")}
                store.add_candidate(job_id, cand.key, seq, cand.to_dict(), score.kl,
                                    score.agreement, costs)

            def stopped() -> bool:
                return cancel.is_set() or self.stopping.is_set()

            hooks = JobHooks(progress=progress, on_scored=on_scored, known=known,
                             cancelled=stopped)
            out = run_job(inputs, tmp_dir / "out", hooks)
            if lost.is_set() or not store.heartbeat(job_id, self.worker_id):
                raise JobLost(job_id)
            if stopped():
                raise SearchCancelled("stopped while building artifacts")
            files = [(kind, path.name if kind != "plot" else f"plots/{path.name}", media_type,
                      path) for kind, path, media_type in out.files]
            try:
                done = store.finish_with_artifacts(job_id, files, out.result, out.timings,
                                                   self.worker_id)
            except (StoreError, DBAPIError, OSError) as e:
                raise ArtifactsNotStored(
                    f"the job ran, but its artifacts could not be stored, so none is kept: "
                    f"{_first_line(e)}") from e
            if not done:
                raise JobLost(job_id)
            log.info("job %s succeeded: top-1 %.4f", job_id, out.result["top1"])

    def _hand_back_on_ray_loss(self, job_id: str, e: BaseException) -> None:
        """Not the job's fault: back to the queue with its candidates, not counted as an
        attempt; this dispatcher leaves the cluster and waits for its head (``run_once``)."""
        released = self.store.release(job_id, self.worker_id)
        log.warning("job %s: the Ray cluster was lost (%s); %s", job_id, _first_line(e),
                    f"requeued with its {self.store.candidate_count(job_id)} stored "
                    "candidates" if released else "it is no longer this dispatcher's")
        disconnect_ray()

    def _heartbeat(self, job_id: str, cancel: threading.Event, lost: threading.Event,
                   done: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_s):
            try:
                if not self.store.heartbeat(job_id, self.worker_id):
                    lost.set()
                    cancel.set()
                    return
                job = self.store.get_job(job_id)
                if job is not None and job.cancel_requested:
                    cancel.set()
            except DatabaseUnavailable as e:  # keep working; the next beat tries again
                log.warning("job %s: heartbeat failed: %s", job_id, e)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None)  # a DBAPIError's driver exception says it best
    text = str(orig if orig is not None else e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:500]
