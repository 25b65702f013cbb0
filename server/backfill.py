"""The online backfill: re-encode stored photos from their kept bytes with the active cloud model, in a background
thread, batch by batch, while searches and adds go on; resumable after a crash.

Order: photos of an older model for which the active model's manifest entry carries a `backfill` scorer go first,
highest `scorer.score(old vector)` first, merged across those models by score; photos of models without a scorer
follow, oldest model first, then by id. A `share` in (0, 1] stops after that share of the photos that needed it.

Durability: the job is a gallery setting (BACKFILL_KEY, JSON) written before the job starts and after each batch.
Its plan is not stored: the photos still to do are those not yet on the target model whose place in the order is
at or before the plan's last photo (`cutoff`), which a restart finds again from the gallery alone. A service that
opens on an unfinished job for its active model resumes it.

Several worker processes of one server: the job runs in the one process that holds its claim (a flock on
`claim`, dropped when the job ends or the process dies); a start in another worker is refused, and every worker's
status shows the recorded job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from models.manifest import Manifest
from server.contract import Conflict
from server.store import Gallery
from server.store.records import Replacement

if TYPE_CHECKING:
    from server.service import Service

log = logging.getLogger("concord.server")

BACKFILL_KEY = "backfill_job"
"""The gallery setting holding the last backfill job (JSON): what it was asked, how far it got, its state."""
PLAN_PAGE = 1024
"""Stored vectors read (and scored) at a time while planning: only their (order, id) pairs are kept."""
FAILED_SHOWN = 100
"""Ids of photos that failed to decode kept in the status (the count goes on beyond)."""


class Item(NamedTuple):
    """One photo of a plan; tuples sort in backfill order: group 0 scored (rank = -score), 1 by model age."""

    group: int
    rank: float
    photo_id: int
    model_id: str

    def key(self) -> list[float]:
        """Its place in the order, as stored in the job's `cutoff`."""
        return [self.group, self.rank, self.photo_id]


class Stopped(Exception):
    """The job was asked to stop while it planned: nothing was recorded, so the next start plans again."""


class Plan(NamedTuple):
    """The photos a backfill to a model re-encodes, in order, and the ones it cannot (their bytes were not kept)."""

    items: list[Item]
    no_bytes: int
    scored: bool


def plan(store: Gallery, manifest: Manifest, target: str, stopping: Callable[[], bool] = lambda: False) -> Plan:
    """Every photo not on `target`, in backfill order (see the module), reading PLAN_PAGE vectors at a time;
    `Stopped` when `stopping()` turns true between two pages."""
    scorers = manifest.model(target).backfill
    age = {entry.id: i for i, entry in enumerate(manifest.of_role("cloud"))}
    items: list[Item] = []
    no_bytes, scored = 0, False
    for page in store.stale_pages(target, PLAN_PAGE):
        if stopping():
            raise Stopped
        no_bytes += int(np.count_nonzero(~page.has_bytes))
        models = np.array(page.models)
        for model in sorted(set(page.models)):
            rows = np.flatnonzero((models == model) & page.has_bytes)
            ids = page.ids[rows].tolist()
            scorer = scorers.get(model)
            if scorer is None:
                items += [Item(1, float(age.get(model, len(age))), i, model) for i in ids]
            elif ids:
                scores = scorer.score(page.vectors[rows]).tolist()
                items += [Item(0, -float(s), i, model) for s, i in zip(scores, ids, strict=True)]
                scored = True
    items.sort()
    return Plan(items, no_bytes, scored)


def batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    """The plan `size` photos at a time: a shutdown stops the job between two of them."""
    for first in range(0, len(items), size):
        yield items[first:first + size]


class Backfill:
    """The one backfill job of a service: its thread, its status, and its durable record (the BACKFILL_KEY setting)."""

    def __init__(self, service: Service, batch: int, claim: Path | None = None) -> None:
        self._service = service
        self._batch = batch
        self._claim_path = claim
        self._claim_fd: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._job: dict[str, Any] = {"state": "idle"}
        self._run_start: tuple[float, int] | None = None
        """(monotonic time, photos done) when this process's run began re-encoding: its rate."""
        self._run_end: float | None = None

    @property
    def running(self) -> bool:
        """Whether the job's thread is at work (planning or re-encoding)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """Whether a job runs here or in another worker process of this server (the one holding the claim)."""
        if self.running or self._claim_fd is not None:
            return True
        if self._claim():
            self._unclaim()
            return False
        return True

    @property
    def store(self) -> Gallery:
        """The service's gallery (the job's record lives in its settings)."""
        return self._service.store

    # ----- control ----------------------------------------------------------------------------------------------

    def start(self, target: str, share: float) -> dict[str, Any]:
        """Start a job to `target` (the caller holds the service's upgrade lock); 409 while one runs."""
        if self.running or not self._claim():
            status = self.status()
            raise Conflict(f"a backfill to {status['target_model']} is running ({status['done']} of "
                           f"{status['total'] if status['total'] is not None else '?'} photos done): watch GET "
                           f"/v1/backfill, and start another once it is done")
        job = {"state": "running", "target_model": target, "share": share, "started_at": time.time(),
               "finished_at": None, "planned": None, "total": None, "done": 0, "skipped_no_bytes": 0,
               "skipped_gone": 0, "failed": 0, "failed_ids": [], "order": None, "cutoff": None, "resumed": 0,
               "message": "planning: reading the stored vectors"}
        self._launch(job)
        return self.status()

    def resume(self) -> None:
        """At open: resume an unfinished job for the active model; show any other last job as it ended (a job
        another worker process runs is left to it)."""
        if not self._claim():
            log.info("the gallery's backfill runs in another worker process of this server; this one leaves it")
            return
        job = self._stored()
        if job is None or job["state"] != "running":
            self._unclaim()
        if job is None:
            return
        active = self._service.active_model
        if job["state"] == "running" and job["target_model"] != active:
            job.update(state="interrupted", message=f"the active model is now {active}, not the job's "
                                                    f"{job['target_model']}: POST /v1/backfill to backfill to it")
            self.store.set_setting(BACKFILL_KEY, json.dumps(job))
            self._unclaim()
        if job["state"] != "running":
            self._job = job
            return
        job["resumed"] = int(job.get("resumed", 0)) + 1
        log.info("resuming the backfill to %s (%s of %s photos done before the restart)", job["target_model"],
                 job["done"], job["total"])
        self._launch(job)

    def stop(self) -> None:
        """Ask the job to stop before its next batch; its record stays 'running', so the next open resumes it."""
        self._stop.set()

    def close(self) -> None:
        """Stop the job between batches and wait for it (see `stop`)."""
        self.stop()
        if self._thread is not None:
            self._thread.join()

    def status(self) -> dict[str, Any]:
        """The job as the API shows it: its record (without the cutoff), the rate of this run and the ETA."""
        with self._lock:
            job = {k: v for k, v in self._job.items() if k != "cutoff"}
            run_start, run_end = self._run_start, self._run_end
        stored = None if self.running else self._stored()
        if stored is not None and stored.get("started_at") != job.get("started_at"):  # a job another worker runs
            job, run_start = {k: v for k, v in stored.items() if k != "cutoff"}, None
        job["failed_ids"] = list(job.get("failed_ids", []))
        rate = eta = None
        if run_start is not None:
            elapsed = (run_end or time.monotonic()) - run_start[0]
            rate = (job["done"] - run_start[1]) / elapsed if elapsed > 0 else 0.0
            left = (job["total"] or 0) - job["done"] - job["failed"] - job["skipped_gone"]
            eta = left / rate if rate > 0 and job["state"] == "running" else None
        job.update(rate=None if rate is None else round(rate, 3), eta_s=None if eta is None else round(eta, 1))
        return job

    def _stored(self) -> dict[str, Any] | None:
        """The job the gallery recorded last, or None (none, or a record this version cannot read)."""
        raw = self.store.get_setting(BACKFILL_KEY)
        if raw is None:
            return None
        try:
            job = json.loads(raw)
            return job if isinstance(job, dict) and "state" in job and "target_model" in job else None
        except ValueError:
            log.warning("the gallery's backfill record is not JSON; ignoring it (%r)", raw[:200])
            return None

    def _launch(self, job: dict[str, Any]) -> None:
        """Record `job` durably, then run it in a thread of its own."""
        self._stop.clear()
        with self._lock:
            self._job, self._run_start, self._run_end = job, None, None
        self._save()
        self._thread = threading.Thread(target=self._run, name="concord-backfill", daemon=True)
        self._thread.start()

    def _save(self) -> None:
        """Write the job's record to the gallery's settings (durable when this returns)."""
        with self._lock:
            record = json.dumps(self._job)
        self.store.set_setting(BACKFILL_KEY, record)

    def _update(self, **changes: Any) -> None:
        """Change fields of the job under the lock (status reads run in other threads)."""
        with self._lock:
            self._job.update(changes)

    # ----- the job ----------------------------------------------------------------------------------------------

    def _claim(self) -> bool:
        """Take the job's claim for this process (True when it is free or held here already)."""
        if self._claim_path is None or self._claim_fd is not None:
            return True
        fd = os.open(self._claim_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._claim_fd = fd
        return True

    def _unclaim(self) -> None:
        if self._claim_fd is not None:
            os.close(self._claim_fd)  # closing drops the flock
            self._claim_fd = None

    def _run(self) -> None:
        """The thread: plan (again, when resuming), then re-encode; the claim is dropped when it ends."""
        try:
            todo = self._todo()
        except Stopped:
            self._pause()
            self._unclaim()
            return
        except Exception as err:
            log.exception("the backfill could not plan")
            self._end("failed", f"the backfill stopped while planning: {err}")
            self._unclaim()
            return
        try:
            self._reencode(todo)
        finally:
            self._unclaim()

    def _reencode(self, todo: list[Item]) -> None:
        """Re-encode the plan batch by batch until done, stopped, or the active model changes."""
        try:
            target = self._job["target_model"]
            with self._lock:
                self._run_start = (time.monotonic(), self._job["done"])
            for chunk in batches(todo, self._batch):
                if self._stop.is_set():
                    self._pause()
                    return
                if self._service.active_model != target:
                    self._end("interrupted", f"the active model changed to {self._service.active_model} (another "
                                             f"server upgraded the gallery); POST /v1/backfill to backfill to it")
                    return
                self._step(chunk, target)
                self._save()
            self._end("done", self._summary())
        except Exception as err:  # a store that went away, a model file that vanished: the job says so and stops
            log.exception("the backfill failed")
            self._end("failed", f"the backfill stopped: {err}")

    def _todo(self) -> list[Item]:
        """The photos this run re-encodes: the plan's first `share` (a new job), or what is left of it (a resume)."""
        job = self._job
        found = plan(self.store, self._service.manifest, job["target_model"], self._stop.is_set)
        if job["cutoff"] is None:  # a new job, or one that stopped while planning
            total = math.ceil(job["share"] * len(found.items) - 1e-9)
            todo = found.items[:total]
            self._update(planned=len(found.items), total=total, skipped_no_bytes=found.no_bytes,
                         order="scorer" if found.scored else "by id",
                         cutoff=todo[-1].key() if todo else [-1, 0.0, 0], message="re-encoding")
        else:
            cutoff = tuple(job["cutoff"])
            todo = [item for item in found.items if tuple(item.key()) <= cutoff]
            done = max(0, int(job["total"]) - len(todo) - int(job["skipped_gone"]))
            self._update(done=done, failed=0, failed_ids=[], message="re-encoding (resumed)")
        self._save()
        return todo

    def _step(self, chunk: list[Item], target: str) -> None:
        """Re-encode one batch from its kept bytes and swap the vectors of the photos still on their old model."""
        found, gone, failed = [], 0, []
        for item in chunk:
            data = self.store.photo_bytes(item.photo_id)
            if data is not None:
                found.append((item, data))
                continue
            record = self.store.get(item.photo_id)
            if record is None or record.model_id != item.model_id:
                gone += 1  # deleted, or re-encoded by another server meanwhile
            else:
                failed.append((item.photo_id, "its kept bytes are missing"))
        by_id = {item.photo_id: item for item, _ in found}
        ids, vectors, bad = self._service.encode_stored(target, [(item.photo_id, data) for item, data in found])
        failed += bad
        swapped = self.store.replace_vectors(target, [Replacement(i, v, by_id[i].model_id)
                                                      for i, v in zip(ids, vectors, strict=True)])
        for photo_id, why in failed:
            log.warning("backfill: photo %s cannot be re-encoded: %s", photo_id, why)
        with self._lock:
            job = self._job
            job["done"] += len(swapped)
            job["skipped_gone"] += gone + len(ids) - len(swapped)
            job["failed"] += len(failed)
            job["failed_ids"] = (job["failed_ids"] + [i for i, _ in failed])[:FAILED_SHOWN]
        self._service.backfilled(target, len(swapped))

    def _pause(self) -> None:
        """Stop for a shutdown: the record stays 'running', so the next start resumes; this process shows
        'interrupted' until it ends."""
        self._update(message="stopped by a shutdown; the next start resumes it")
        self._save()
        with self._lock:
            self._job["state"] = "interrupted"

    def _summary(self) -> str:
        """What a finished job did, in one line (its message)."""
        job = self._job
        return (f"{job['done']} photos re-encoded with {job['target_model']} ({job['order']} order); "
                f"{job['skipped_no_bytes']} without kept bytes, {job['skipped_gone']} deleted meanwhile, "
                f"{job['failed']} failed")

    def _end(self, state: str, message: str) -> None:
        """Finish the job in `state` and record it (a record that cannot be written stays 'running': resumed)."""
        self._update(state=state, message=message, finished_at=time.time())
        with self._lock:
            self._run_end = time.monotonic()
        try:
            self._save()
        except Exception:  # the store itself failed: the record stays 'running' and the next open resumes
            log.exception("the backfill's end could not be recorded")
        log.info("backfill %s: %s", state, message)
