"""Candidate evaluation on Ray.

A job's model, validation images and calibration statistics (a ``Calibrator``) are put in the
object store once; each worker is an actor that loads them once and then scores any number of
candidates (each call one Ray task). Scores do not depend on which worker computes them: a
calibration is a pure function of the statistics and the candidate, so a result does not depend
on the number of workers either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
import torch
from torch import Tensor, nn

from quant import Calibrator, QuantConfig
from quant.stream import ImageStream
from search.objective import Objective, Score
from search.space import Candidate
from search.strategies import NO_PREFETCH, Prefetch, SearchCancelled

from .memory import keep_freed_memory


@dataclass
class JobContext:
    """Everything a worker needs, shipped once per job."""

    model: nn.Module
    calibrator: Calibrator
    val_images: Tensor | ImageStream
    base: QuantConfig


# A killed actor process is restarted by Ray (``max_restarts``); its task is not retried by Ray
# (``max_task_retries=0``) but handed by the pool to whichever actor is ready: a task retried on
# its own actor waits for that actor, which after a node loss may wait for a free CPU forever.
@ray.remote(max_restarts=2, max_task_retries=0)
class CandidateEvaluator:
    def __init__(self, context: JobContext, threads: int = 1) -> None:
        keep_freed_memory()  # a forward pass reuses the last one's pages (``workers.memory``)
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ctx = context
        if device == "cuda":
            ctx.model = ctx.model.to(device)
        val = ctx.val_images
        if isinstance(val, ImageStream):  # read here, in this actor's one CPU
            val = val.in_process()
        self.objective = Objective(ctx.model, ctx.calibrator, val, ctx.base)
        self._searched_before = ctx.calibrator.modules_searched  # by the job's own process
        self.pid = os.getpid()

    # A score is two tasks, submitted together: ``calibrate`` (the module searches) returns the
    # searches it made as soon as they are done, and ``measure`` (the forward pass over the
    # validation images, about two thirds of a candidate) follows on its own. The pool hands the
    # searches on while this actor measures, so a task the other actor starts meanwhile (a
    # greedy step's scored-ahead candidate needs both of the step's searches) skips them; handed
    # on only with the whole score, 114 of a 473-candidate search's module searches were made
    # by both actors (6.7 s of 108 s busy). A candidate with nothing left to search is one
    # ``score`` task.
    @ray.method(num_returns=2)
    def calibrate(self, candidate: dict, shared: Sequence = ()) -> tuple[int, dict]:
        """``shared``: references to the module calibrations the other workers searched since
        this one's last task; returned: how many this task searched, and those, for the others
        (the pool hands on their reference and never reads them)."""
        self._import(shared)
        self.objective.calibrate(Candidate.from_dict(candidate))
        searched = self.objective.calibrator.export_calibrations()
        return len(searched["items"]), searched

    def measure(self, candidate: dict) -> tuple[float, float]:
        """The score of the candidate this actor's last ``calibrate`` was given."""
        s = self.objective.measure(Candidate.from_dict(candidate))
        return s.kl, s.agreement

    def score(self, candidate: dict, shared: Sequence = ()) -> tuple[float, float]:
        """Both halves in one task, for a candidate whose module calibrations are all made
        (anything it did search goes out with this actor's next ``calibrate``)."""
        self._import(shared)
        s = self.objective(Candidate.from_dict(candidate))
        return s.kl, s.agreement

    def _import(self, shared: Sequence) -> None:
        for ref in shared:
            try:
                calibrations = ray.get(ref)
            except ray.exceptions.RayError:  # lost with its node: a search made again, no more
                continue
            self.objective.calibrator.import_calibrations(calibrations)

    def searches(self) -> int:
        """Module calibrations this actor has searched."""
        return self.objective.calibrator.modules_searched - self._searched_before

    def ping(self) -> int:
        return self.pid

    def node(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()


class RayUnavailable(RuntimeError):
    """The Ray cluster's head cannot be reached: the job's Ray work cannot go on (the dispatcher
    hands the job back to the queue and waits for the head)."""


def head_address() -> str | None:
    """The GCS address of the Ray this process is connected to (else of ``RAY_ADDRESS``)."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = os.environ.get("RAY_ADDRESS")
    return address if address and address != "auto" else None


def head_reachable(address: str | None = None, timeout_s: float = 1.0) -> bool:
    """A TCP connection to the GCS port: cheap, and it answers at once when the head process is
    gone (Ray's own client retries for a minute, then ends the process)."""
    address = address or head_address()
    if address is None:
        return True
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray.

    Ray's core worker installs a failure signal handler for SIGTERM that logs and ends the
    process at once; a process that handles SIGTERM itself (a dispatcher hands its job back
    and stops its Ray in order) gets its own handler back."""
    if not ray.is_initialized():
        own = signal.getsignal(signal.SIGTERM)
        address = os.environ.get("RAY_ADDRESS")
        if address:  # a cluster's resources are its own: num_cpus applies to a local Ray only
            if not head_reachable(address if address != "auto" else None):
                raise RayUnavailable(f"the Ray head at {address} (RAY_ADDRESS) is unreachable")
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                raise RayUnavailable(f"cannot join the Ray cluster at {address}: {e}") from e
        else:
            # "local": a new Ray of this process's own. Without it ray.init joins the cluster
            # last started on this machine (/tmp/ray/ray_current_cluster), and waits forever
            # when that cluster is gone.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
        if callable(own) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, own)


def disconnect_ray() -> None:
    """Leave the cluster (after its head was lost: a later ``ensure_ray`` joins it anew)."""
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class _Task:
    candidate: Candidate
    actor: int
    searched: object  # its ``calibrate`` half's first ObjectRef (how many it searched); or None
    calibrations: object = None  # its second: what it searched
    measures: bool = True  # False: a search made ahead, no ``measure`` half


class EvaluatorPool:
    """``pool.map(candidates)`` scores candidates on ``workers`` actors, one task per actor in
    flight (``ray.wait`` hands the next candidate to whichever finishes); ``cancel`` (or a
    ``cancelled()`` callable returning True) stops it and cancels the tasks in flight.

    Actors are spread over the cluster's nodes (``SPREAD``) and join the pool when they answer,
    so a job starts with the actors the cluster can place and takes the others as CPUs free up.
    A task whose actor (or node) dies goes to the next ready actor; a dead actor is replaced.
    A head that stays unreachable for ``head_grace_s`` raises ``RayUnavailable``.

    ``map(..., prefetch=Prefetch(score, search))``: what the caller will likely ask for next.
    An actor with nothing else to do scores one of ``score`` (its score is kept aside and
    handed out only if a later ``map`` asks for that candidate) or, when those would wait for a
    search in flight, makes the module searches of one of ``search`` (handed on like any
    other). Hints change what is computed when, never a result."""

    MAX_FAILURES = 3  # actor deaths while scoring one candidate before the pool gives up

    def __init__(self, context: JobContext, workers: int,
                 cancelled: Callable[[], bool] | None = None, head_grace_s: float = 5.0) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        ensure_ray()
        self.workers = workers
        self.head_grace_s = head_grace_s
        self._head = head_address()
        self.context_ref = ray.put(context)  # held: restarted actors re-read it
        self._gpus = 1 if torch.cuda.is_available() else 0
        self.actors: list = []
        self._dead: set[int] = set()
        self._idle: list[int] = []
        self._pings: dict = {}     # ObjectRef → actor index, for actors not yet ready
        self._tasks: dict = {}     # ObjectRef of a ``measure`` → _Task
        self._searched: dict = {}  # ObjectRef of a ``calibrate`` not yet handed on → _Task
        # Module calibrations (``Candidate.module_overrides``) some task's ``calibrate`` half
        # has made or restored: every actor has them or gets them with its next task.
        self._known: set = set()
        self._hints: list[Candidate] = []
        self._search_hints: list[Candidate] = []
        self._aside: dict[str, Score] = {}   # scores of hints no map has asked for yet
        self._failures: dict[str, int] = {}
        self.ahead_scored = self.ahead_used = 0  # hints scored ahead, and later asked for
        self.searched_ahead = 0  # search hints given to idle actors
        self._spawned = 0
        self._cancel = False
        self._cancelled = cancelled
        self._head_lost_since: float | None = None
        self._head_checked = time.monotonic()
        # Per actor, the module calibrations the other actors searched since its last task. A
        # calibration is a pure function of the shared statistics and the module's widths and
        # pins, so handing them on changes no score; it saves each actor repeating the searches
        # another made (a greedy step's accepted layer, a probe revisited): with 2 workers the
        # actors spent ~30% more per candidate than 1 worker without it. Tried and measured,
        # not kept: a per-search board actor asked right before each module search and told
        # right after. It cut the digits greedy search's module searches with 2 workers from
        # 415 to 372 (301 with one), but its round trips cost each actor ~3.5 s per search
        # (measured with one worker), more than the ~2 s of searches it saved it.
        self._inbox: list[list[ray.ObjectRef]] = []
        for _ in range(workers):
            self._spawn()

    @property
    def cancelled(self) -> bool:
        return self._cancel or (self._cancelled is not None and self._cancelled())

    def _spawn(self) -> None:
        # One CPU held for the actor's life (an actor's default holds none once placed, so a
        # node would take any number), spread over the nodes.
        actor = CandidateEvaluator.options(num_cpus=1, num_gpus=self._gpus,
                                           scheduling_strategy="SPREAD").remote(self.context_ref)
        self.actors.append(actor)
        self._inbox.append([])
        self._pings[actor.ping.remote()] = len(self.actors) - 1
        self._spawned += 1

    def _alive(self) -> int:
        return len(self.actors) - len(self._dead)

    def _submit(self, cand: Candidate) -> None:
        a = self._idle.pop(0)
        shared, self._inbox[a] = self._inbox[a], []
        actor, candidate = self.actors[a], cand.to_dict()
        if cand.module_overrides() <= self._known:  # nothing to search and hand on: one task
            self._tasks[actor.score.remote(candidate, shared)] = _Task(cand, a, None)
            return
        task = self._calibrate(a, cand, shared, measures=True)
        self._tasks[actor.measure.remote(candidate)] = task

    def _calibrate(self, a: int, cand: Candidate, shared: list, measures: bool) -> _Task:
        """Start ``cand``'s ``calibrate`` half on actor ``a``; ``_hand_on`` sees it end."""
        count, searched = self.actors[a].calibrate.remote(cand.to_dict(), shared)
        task = _Task(cand, a, count, searched, measures)
        self._searched[count] = task
        return task

    def _search_ahead(self) -> bool:
        """Give an idle actor the first search hint with a module calibration nobody has made
        or is making (its ``calibrate`` half only); whether one was given."""
        in_flight = set().union(*(t.candidate.module_overrides()
                                  for t in self._searched.values()))
        while self._search_hints:
            todo = self._search_hints[0].module_overrides() - self._known
            if not todo:
                self._search_hints.pop(0)  # made already
            elif todo & in_flight:
                return False  # being made: the next hints may need it too
            else:
                a = self._idle.pop(0)
                shared, self._inbox[a] = self._inbox[a], []
                self._calibrate(a, self._search_hints.pop(0), shared, measures=False)
                self.searched_ahead += 1
                return True
        return False

    def _hand_on(self, ref) -> None:
        """A ``calibrate`` half is done: its searches go to every other actor's next task. An
        actor lost under it is handled by its ``measure`` half, which fails too."""
        task = self._searched.pop(ref)
        a = task.actor
        try:
            count = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            if not task.measures:
                self._lost(a)
            return
        self._known |= task.candidate.module_overrides()
        if not task.measures:
            self._idle.append(a)
        if count:  # the reference only: the calibrations go from actor to actor
            for other, inbox in enumerate(self._inbox):
                if other != a:
                    inbox.append(task.calibrations)

    def _searching_for(self, cand: Candidate) -> bool:
        """Whether a task still in its ``calibrate`` half changes one of ``cand``'s modules as
        ``cand`` does. A greedy step's scored-ahead candidate shares its new layer with the
        step's trial that an actor has just started: started at once, both actors searched it
        (61 of 432 module searches in a digits search, each within 0.25 s of the other); it
        waits the rest of that search instead. Modules some task has calibrated already do not
        count: the candidates of one greedy state share all of its earlier steps. Timing only:
        a calibration is the same whoever searches it."""
        mine = cand.module_overrides() - self._known
        return bool(mine) and any(mine & t.candidate.module_overrides()
                                  for t in self._searched.values())

    def _lost(self, a: int) -> None:
        """Actor ``a`` died under a task: probe it (Ray restarts it where a CPU is free); the
        probe's answer puts it back in the pool, or its failure replaces it."""
        self._pings[self.actors[a].ping.remote()] = a
        self._check_head(force=True)

    def _check_head(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._head_checked < 1.0:
            return
        self._head_checked = now
        if head_reachable(self._head):
            self._head_lost_since = None
            return
        self._head_lost_since = self._head_lost_since or now
        if now - self._head_lost_since >= self.head_grace_s:
            raise RayUnavailable(f"the Ray head at {self._head} has been unreachable for "
                                 f"{now - self._head_lost_since:.0f} s")

    def map(self, candidates: Sequence[Candidate],
            done: Callable[[int, Score], None] | None = None,
            prefetch: Prefetch = NO_PREFETCH) -> list[Score]:
        results: list[Score | None] = [None] * len(candidates)
        where: dict[str, list[int]] = {}
        for i, cand in enumerate(candidates):
            where.setdefault(cand.key, []).append(i)
        first = {k: candidates[ix[0]] for k, ix in where.items()}
        running = {t.candidate.key for t in self._tasks.values()}
        waiting = set(where)

        def finish(key: str, score: Score) -> None:
            waiting.discard(key)
            for i in where[key]:
                results[i] = score
                if done is not None:
                    done(i, score)

        for key in list(where):
            if key in self._aside:
                self.ahead_used += 1
                finish(key, self._aside.pop(key))
            elif key in running:
                self.ahead_used += 1
        queue = [first[k] for k in where if k in waiting and k not in running]
        self._hints = [c for c in prefetch.score if c.key not in where]
        self._search_hints = list(prefetch.search)
        while waiting:
            if self.cancelled:
                for ref in [*self._searched, *self._tasks]:
                    ray.cancel(ref)
                self._tasks.clear()
                self._searched.clear()
                raise SearchCancelled("search cancelled")
            while queue and self._idle:  # in order, past those that would repeat a search
                i = next((i for i, c in enumerate(queue) if not self._searching_for(c)), None)
                if i is None:
                    break
                self._submit(queue.pop(i))
            while self._hints and self._idle:  # in order, past those that would wait
                busy = {t.candidate.key for t in self._tasks.values()}
                self._hints = [h for h in self._hints
                               if h.key not in self._aside and h.key not in busy]
                i = next((i for i, h in enumerate(self._hints) if not self._searching_for(h)),
                         None)
                if i is None:
                    break  # ray.wait below returns with that search, handed on
                self._submit(self._hints.pop(i))
                self.ahead_scored += 1
            while self._search_hints and self._idle:
                if not self._search_ahead():
                    break
            # A timeout, so that a cancel (and a lost head) is seen while a long candidate runs.
            ready, _ = ray.wait([*self._searched, *self._tasks, *self._pings], num_returns=1,
                                timeout=0.5)
            for ref in ready:
                if ref in self._pings:
                    self._answered(ref)
                    continue
                if ref in self._searched:
                    self._hand_on(ref)
                    continue
                task = self._tasks.pop(ref)
                key = task.candidate.key
                if task.searched in self._searched:  # done before its measure: hand it on first
                    self._hand_on(task.searched)
                try:
                    kl, agreement = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    self._lost(task.actor)
                    if key in waiting:
                        self._failures[key] = self._failures.get(key, 0) + 1
                        if self._failures[key] >= self.MAX_FAILURES:
                            raise RuntimeError(
                                f"candidate {key}: its Ray worker died {self.MAX_FAILURES} "
                                "times while scoring it") from None
                        queue.insert(0, task.candidate)
                    continue
                score = Score(kl=kl, agreement=agreement)
                self._idle.append(task.actor)
                if key in waiting:
                    finish(key, score)
                else:
                    self._aside[key] = score
            self._check_head()
        return results  # type: ignore[return-value]

    def _answered(self, ref) -> None:
        a = self._pings.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again
            self._check_head(force=True)
            time.sleep(0.1)
            self._pings[self.actors[a].ping.remote()] = a
            return
        except ray.exceptions.RayActorError:
            # Gone for good (its restarts used up): a fresh actor takes its place.
            self._dead.add(a)
            if self._alive() < self.workers and self._spawned < 3 * self.workers:
                self._spawn()
            elif not self._alive():
                raise RuntimeError("every Ray worker of this job died") from None
            return
        self._idle.append(a)

    def warm_up(self) -> None:
        """Wait until every actor has answered and scored one candidate (benchmarks start their
        clock after it)."""
        while self._pings:
            ready, _ = ray.wait(list(self._pings), num_returns=1)
            self._answered(ready[0])
        empty = Candidate().to_dict()
        ray.get([ref for a in self._idle for ref in (*self.actors[a].calibrate.remote(empty),
                                                      self.actors[a].measure.remote(empty))])

    def module_searches(self) -> list[int]:
        """Per live actor, the module calibrations it has searched (what sharing saves)."""
        return ray.get([a.searches.remote() for i, a in enumerate(self.actors)
                        if i not in self._dead])

    def nodes(self) -> list[str]:
        """The node of each live actor."""
        return ray.get([a.node.remote() for i, a in enumerate(self.actors)
                        if i not in self._dead])

    def __call__(self, candidate: Candidate) -> Score:
        return self.map([candidate])[0]

    def cancel(self) -> None:
        self._cancel = True

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # a lost head or actor: nothing left to stop
                ray.kill(a, no_restart=True)
