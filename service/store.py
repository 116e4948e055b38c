"""Transactional access to the service database, shared by the API and the dispatchers.

Each method is one short transaction and returns *detached* ORM objects (``service.models``):
their columns stay readable after the session closes, they have no relationships to lazy-load,
and changing them changes nothing in the database (only store methods write).

State changes are conditional ``UPDATE ... WHERE status = ...`` statements, so a dispatcher and
the API racing on one job cannot both win: a finished job is never overwritten. Claiming uses
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and ``BEGIN IMMEDIATE`` on SQLite, so several
dispatcher processes never claim the same job.

Connection failures surface as ``DatabaseUnavailable`` (the API answers 503).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import URL, Engine, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from service.db import SQLITE_IMMEDIATE, make_engine, make_sessionmaker
from service.models import (
    ARTIFACT_KINDS,
    JOB_STATUSES,
    Artifact,
    ArtifactChunk,
    Candidate,
    Job,
    ModelChunk,
    UploadedModel,
    utcnow,
)

Source = BinaryIO | bytes | bytearray | memoryview | Path
ChunkTable = type[ArtifactChunk] | type[ModelChunk]


class StoreError(Exception):
    """Base of the store's own errors."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached (or stays locked past the busy timeout)."""


class NotFound(StoreError):
    """The job, artifact or model named does not exist."""


class TooLarge(StoreError):
    """An upload exceeded its size limit; nothing was stored."""


class Store:
    """The service's storage; see the module docstring for the guarantees."""

    def __init__(self, sessions: sessionmaker[Session], *, chunk_bytes: int = 1 << 20) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise ValueError("the sessionmaker must be bound to an Engine")
        self.sessions = sessions
        self.engine = bind
        self.chunk_bytes = chunk_bytes
        self._pg = bind.dialect.name == "postgresql"
        # SQLite: this process's writers queue here, in order, rather than in SQLite's busy
        # handler, which retries a locked database after sleeps of up to 100 ms (a tail of
        # hundreds of ms under concurrent writes). Other processes still meet the busy handler.
        self._write_lock = threading.Lock() if bind.dialect.name == "sqlite" else None

    @classmethod
    def from_url(cls, url: str | URL, *, chunk_bytes: int = 1 << 20) -> Store:
        """A store on a new engine for ``url`` (the database must be migrated already)."""
        return cls(make_sessionmaker(make_engine(url)), chunk_bytes=chunk_bytes)

    @contextlib.contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction; ``write`` takes SQLite's write lock up front, so a read-then-write
        transaction cannot fail half way with SQLITE_BUSY when another process wrote meanwhile."""
        serialized = self._write_lock if write and self._write_lock is not None else None
        try:
            with serialized or contextlib.nullcontext(), self.sessions() as session, \
                    session.begin():
                if write:
                    session.connection(execution_options={SQLITE_IMMEDIATE: True})
                yield session
        except (OperationalError, PoolTimeout) as e:
            raise DatabaseUnavailable(f"database unavailable: {_reason(e)}") from e
        except DBAPIError as e:
            if e.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {_reason(e)}") from e
            raise

    def ping(self) -> None:
        """Raise ``DatabaseUnavailable`` unless the database answers ``SELECT 1``."""
        with self._tx() as s:
            s.execute(text("SELECT 1"))

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, request: dict[str, Any]) -> Job:
        """A new queued job for the (already validated) ``request``."""
        job = Job(status="queued", request=request, progress_done=0, progress_total=0,
                  claims=0, cancel_requested=False, created_at=utcnow())
        with self._tx(write=True) as s:
            s.add(job)
        return job

    def get_job(self, job_id: str) -> Job | None:
        with self._tx() as s:
            return s.get(Job, job_id)

    def list_jobs(self, status: str | None = None, limit: int = 50,
                  offset: int = 0) -> tuple[list[Job], int]:
        """One page of jobs, newest first, and the number of jobs matching ``status``."""
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"unknown status {status!r}; choose from {JOB_STATUSES}")
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        where = [Job.status == status] if status is not None else []
        with self._tx() as s:
            total = s.scalar(select(func.count()).select_from(Job).where(*where)) or 0
            jobs = s.scalars(select(Job).where(*where)
                             .order_by(Job.created_at.desc(), Job.id.desc())
                             .limit(limit).offset(offset)).all()
        return list(jobs), total

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; flag a running one (its dispatcher finishes it as cancelled);
        leave a finished one as it is. Returns the job as it is afterwards, or None."""
        now = utcnow()
        with self._tx(write=True) as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                             .values(status="cancelled", finished_at=now)).rowcount
            if not done:
                s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                          .values(cancel_requested=True))
            return s.get(Job, job_id)

    def claim_next(self, worker_id: str) -> Job | None:
        """Atomically move the oldest queued job to running for ``worker_id``; None if none."""
        with self._tx(write=True) as s:
            while True:
                job_id = s.scalar(select(Job.id).where(Job.status == "queued")
                                  .order_by(Job.created_at, Job.id).limit(1)
                                  .with_for_update(skip_locked=True))
                if job_id is None:
                    return None
                now = utcnow()
                claimed = s.execute(
                    update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(status="running", claimed_by=worker_id, heartbeat_at=now,
                            started_at=func.coalesce(Job.started_at, now),
                            claims=Job.claims + 1)).rowcount
                if claimed:  # always, given the lock; the check keeps it safe regardless
                    return s.get(Job, job_id)

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Record that ``worker_id`` is alive on ``job_id``; False if it no longer owns the job
        (finished, cancelled, or requeued as stale and claimed again). Cancellation requests
        are read with ``get_job(job_id).cancel_requested``."""
        with self._tx(write=True) as s:
            return bool(s.execute(
                update(Job).where(Job.id == job_id, Job.status == "running",
                                  Job.claimed_by == worker_id)
                .values(heartbeat_at=utcnow())).rowcount)

    def requeue_stale(self, stale_after_s: float) -> list[str]:
        """Requeue running jobs whose heartbeat is older than ``stale_after_s`` seconds (their
        dispatcher died); returns their ids. A stale job whose cancel was requested is marked
        cancelled instead (and not returned)."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        stale = (Job.status == "running", Job.heartbeat_at < cutoff)
        requeued = []
        with self._tx(write=True) as s:
            ids = s.scalars(select(Job.id).where(*stale).order_by(Job.created_at)
                            .with_for_update(skip_locked=True)).all()
            for job_id in ids:
                cancel = s.execute(
                    update(Job).where(Job.id == job_id, *stale, Job.cancel_requested)
                    .values(status="cancelled", finished_at=now)).rowcount
                if not cancel and s.execute(
                        update(Job).where(Job.id == job_id, *stale)
                        .values(status="queued", claimed_by=None, heartbeat_at=None)).rowcount:
                    requeued.append(job_id)
        return requeued

    def abandon_stale(self, stale_after_s: float, max_attempts: int) -> list[str]:
        """Fail the stale running jobs that ``max_attempts`` dispatchers have claimed already
        and that stopped without finishing each time (killed, out of memory, a crash in native
        code): requeued once more, such a job would take the next dispatcher down too. Their
        ids; the error names the attempts and the last dispatcher's last stage."""
        now = utcnow()
        stale = (Job.status == "running", Job.heartbeat_at < now - timedelta(seconds=stale_after_s),
                 Job.claims >= max_attempts)
        failed = []
        with self._tx(write=True) as s:
            jobs = s.execute(select(Job.id, Job.claims, Job.claimed_by, Job.stage,
                                    Job.progress_done, Job.progress_total).where(*stale)
                             .order_by(Job.created_at).with_for_update(skip_locked=True)).all()
            for job_id, claims, worker, stage, done, total in jobs:
                error = (f"abandoned after {claims} attempts: each dispatcher that ran this job "
                         f"stopped without finishing it (killed, out of memory, or a crash in "
                         f"native code); the last one ({worker}) was at stage "
                         f"{stage or 'start'!r} ({done}/{total}). TSPTQ_MAX_ATTEMPTS="
                         f"{max_attempts} sets how many attempts a job gets.")
                if s.execute(update(Job).where(Job.id == job_id, *stale)
                             .values(status="failed", error=error, finished_at=now)).rowcount:
                    failed.append(job_id)
        return failed

    def release(self, job_id: str, worker_id: str) -> bool:
        """Running → queued, by the dispatcher that owns the job and is stopping in order: the
        next dispatcher resumes it from its stored candidates. The claim is given back, so an
        orderly stop does not count as an attempt that failed (``abandon_stale``). False (and
        no change) if ``worker_id`` no longer owns the job."""
        with self._tx(write=True) as s:
            return bool(s.execute(
                update(Job).where(Job.id == job_id, Job.status == "running",
                                  Job.claimed_by == worker_id)
                .values(status="queued", claimed_by=None, heartbeat_at=None,
                        claims=Job.claims - 1)).rowcount)

    def set_progress(self, job_id: str, done: int, total: int, stage: str | None = None) -> None:
        """Progress of a running job; ``stage=None`` keeps the current stage."""
        values: dict[str, Any] = {"progress_done": done, "progress_total": total}
        if stage is not None:
            values["stage"] = stage
        with self._tx(write=True) as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                      .values(**values))

    # ``worker_id``, when given: act only while that dispatcher still owns the job (one that
    # lost it as stale must not overwrite the run that took over).

    def finish(self, job_id: str, result: dict[str, Any], timings: dict[str, Any],
               worker_id: str | None = None) -> bool:
        """Running → succeeded. False (and no change) if the job was not running."""
        return self._end(job_id, worker_id, status="succeeded", result=result, timings=timings)

    def fail(self, job_id: str, error: str, timings: dict[str, Any] | None = None,
             worker_id: str | None = None) -> bool:
        """Running → failed. False (and no change) if the job was not running."""
        return self._end(job_id, worker_id, status="failed", error=error, timings=timings)

    def mark_cancelled(self, job_id: str, worker_id: str | None = None) -> bool:
        """Running → cancelled. False (and no change) if the job was not running."""
        return self._end(job_id, worker_id, status="cancelled")

    def _end(self, job_id: str, worker_id: str | None, **values: Any) -> bool:
        where = [Job.id == job_id, Job.status == "running"]
        if worker_id is not None:
            where.append(Job.claimed_by == worker_id)
        with self._tx(write=True) as s:
            return bool(s.execute(
                update(Job).where(*where).values(finished_at=utcnow(), **values)).rowcount)

    # -- candidates ---------------------------------------------------------------------------

    def add_candidate(self, job_id: str, key: str, seq: int, spec: dict[str, Any], kl: float,
                      agreement: float, costs: dict[str, Any]) -> bool:
        """Record an evaluated candidate; a repeated ``key`` is ignored (returns False), so a
        resumed search may re-report what it already stored."""
        stmt = ((postgresql if self._pg else sqlite).insert(Candidate)
                .values(job_id=job_id, key=key, seq=seq, spec=spec, kl=kl, agreement=agreement,
                        costs=costs, created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["job_id", "key"]))
        with self._tx(write=True) as s:
            if self._pg:  # psycopg reports rowcount -1 when the id comes back by RETURNING
                return s.execute(stmt.returning(Candidate.id)).first() is not None
            return bool(s.execute(stmt).rowcount)

    def candidates(self, job_id: str) -> list[Candidate]:
        """A job's candidates in search order."""
        with self._tx() as s:
            return list(s.scalars(select(Candidate).where(Candidate.job_id == job_id)
                                  .order_by(Candidate.seq, Candidate.id)).all())

    def candidate_count(self, job_id: str) -> int:
        """How many candidates the job has: candidates are only ever added, so the count
        tells whether a copy of them is current."""
        with self._tx() as s:
            return s.scalar(select(func.count()).select_from(Candidate)
                            .where(Candidate.job_id == job_id)) or 0

    def candidate_scores(self, job_id: str) -> dict[str, tuple[float, float]]:
        """``{key: (kl, agreement)}``: what a resumed search need not evaluate again."""
        with self._tx() as s:
            rows = s.execute(select(Candidate.key, Candidate.kl, Candidate.agreement)
                             .where(Candidate.job_id == job_id)).all()
        return {key: (kl, agreement) for key, kl, agreement in rows}

    # -- artifacts ----------------------------------------------------------------------------

    def add_artifact(self, job_id: str, kind: str, name: str, media_type: str,
                     source: Source) -> Artifact:
        """Store ``source`` as the job's artifact ``name``, streamed in ``chunk_bytes`` pieces
        in one transaction (nobody sees half an artifact). An artifact of the same name is
        replaced: a job requeued after its dispatcher died writes its artifacts again."""
        _check_kind(kind)
        with self._tx(write=True) as s:
            if s.get(Job, job_id) is None:
                raise NotFound(f"no job {job_id}")
            return self._put_artifact(s, job_id, kind, name, media_type, source)

    def _put_artifact(self, s: Session, job_id: str, kind: str, name: str, media_type: str,
                      source: Source) -> Artifact:
        s.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
        artifact = Artifact(job_id=job_id, kind=kind, name=name, media_type=media_type,
                            size=0, sha256="", created_at=utcnow())
        s.add(artifact)
        s.flush()
        artifact.size, artifact.sha256 = self._write_chunks(s, ArtifactChunk, artifact.id, source)
        return artifact

    def finish_with_artifacts(self, job_id: str, files: list[tuple[str, str, str, Source]],
                              result: dict[str, Any], timings: dict[str, Any],
                              worker_id: str | None = None) -> bool:
        """Store ``files`` (kind, name, media type, source) and mark the job succeeded, in one
        transaction: if any write fails (the disk full, a row refused) nothing of it is listed
        or downloadable and the job is still running, for the caller to fail. False (and
        nothing stored) if the job was not running (or not ``worker_id``'s)."""
        for kind, *_ in files:
            _check_kind(kind)
        where = [Job.id == job_id, Job.status == "running"]
        if worker_id is not None:
            where.append(Job.claimed_by == worker_id)
        with self._tx(write=True) as s:
            if s.scalar(select(Job.id).where(*where)) is None:
                return False
            for kind, name, media_type, source in files:
                self._put_artifact(s, job_id, kind, name, media_type, source)
            s.flush()
            return bool(s.execute(update(Job).where(*where).values(
                status="succeeded", result=result, timings=timings,
                finished_at=utcnow())).rowcount)

    def artifacts(self, job_id: str) -> list[Artifact]:
        with self._tx() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id)
                                  .order_by(Artifact.created_at, Artifact.name)).all())

    def get_artifact(self, artifact_id: str) -> Artifact | None:
        with self._tx() as s:
            return s.get(Artifact, artifact_id)

    def iter_artifact(self, artifact_id: str) -> Iterator[bytes]:
        """The artifact's bytes, chunk by chunk. Raises ``NotFound`` now, not when iterated."""
        if self.get_artifact(artifact_id) is None:
            raise NotFound(f"no artifact {artifact_id}")
        return self._iter_chunks(ArtifactChunk, artifact_id)

    # -- uploaded models ----------------------------------------------------------------------

    def add_model(self, name: str, source: Source, max_bytes: int) -> UploadedModel:
        """Store an uploaded model file; ``TooLarge`` (and nothing stored) past ``max_bytes``."""
        with self._tx(write=True) as s:
            model = UploadedModel(name=name, size=0, sha256="", created_at=utcnow())
            s.add(model)
            s.flush()
            model.size, model.sha256 = self._write_chunks(
                s, ModelChunk, model.id, source, max_bytes=max_bytes)
        return model

    def get_model(self, model_id: str) -> UploadedModel | None:
        with self._tx() as s:
            return s.get(UploadedModel, model_id)

    def list_models(self, limit: int = 100) -> list[UploadedModel]:
        """The newest uploads (the dashboard's form offers them as weights)."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        with self._tx() as s:
            return list(s.scalars(select(UploadedModel)
                                  .order_by(UploadedModel.created_at.desc(),
                                            UploadedModel.id.desc()).limit(limit)).all())

    def iter_model(self, model_id: str) -> Iterator[bytes]:
        """The model file's bytes, chunk by chunk. Raises ``NotFound`` now, not when iterated."""
        if self.get_model(model_id) is None:
            raise NotFound(f"no uploaded model {model_id}")
        return self._iter_chunks(ModelChunk, model_id)

    def write_model_to(self, model_id: str, path: str | Path) -> Path:
        """Write the uploaded model to ``path`` (atomically: a temporary file renamed into
        place once its sha256 checks out) so that loaders can open it as a file."""
        model = self.get_model(model_id)
        if model is None:
            raise NotFound(f"no uploaded model {model_id}")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as f:
                for chunk in self._iter_chunks(ModelChunk, model_id):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != model.sha256:
                raise StoreError(f"uploaded model {model_id} is corrupt: sha256 mismatch")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- chunked payloads (artifacts and models alike) ----------------------------------------

    def _write_chunks(self, s: Session, table: ChunkTable, owner_id: str, source: Source,
                      max_bytes: int | None = None) -> tuple[int, str]:
        """Insert ``source`` as ``table`` rows of ``chunk_bytes`` each; returns (size, sha256).
        Each chunk is sent as it is read, so memory holds one chunk at a time."""
        owner = _owner_column(table)
        digest, size = hashlib.sha256(), 0
        with _open(source) as stream:
            for seq, chunk in enumerate(_read_chunks(stream, self.chunk_bytes)):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                digest.update(chunk)
                s.execute(insert(table).values({owner: owner_id, "seq": seq, "data": chunk}))
        return size, digest.hexdigest()

    def _iter_chunks(self, table: ChunkTable, owner_id: str) -> Iterator[bytes]:
        """Chunks in order, one short query each: serving a large file holds neither the file
        in memory nor a transaction open."""
        owner = getattr(table, _owner_column(table))
        seq = 0
        while True:
            with self._tx() as s:
                data = s.scalar(select(table.data).where(owner == owner_id, table.seq == seq))
            if data is None:
                return
            yield bytes(data)
            seq += 1


def _check_kind(kind: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; choose from {ARTIFACT_KINDS}")


def _owner_column(table: ChunkTable) -> str:
    return "artifact_id" if table is ArtifactChunk else "model_id"


@contextlib.contextmanager
def _open(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with source.open("rb") as f:
            yield f
    elif isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    else:
        yield source  # the caller's stream: the caller closes it


def _read_chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """Pieces of exactly ``size`` bytes (the last may be shorter), even from streams whose
    ``read`` returns less than asked (sockets, pipes)."""
    while True:
        buf = stream.read(size)
        if not buf:
            return
        while len(buf) < size:
            more = stream.read(size - len(buf))
            if not more:
                break
            buf += more
        yield bytes(buf)


def _reason(e: DBAPIError | PoolTimeout) -> str:
    orig = getattr(e, "orig", None)
    message = str(orig if orig is not None else e).strip()
    return message.splitlines()[0] if message else type(e).__name__
