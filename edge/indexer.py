"""Bulk indexing client: walk a folder, skip what the server holds (by sha256), upload the rest in batches.

Resuming after an interruption needs no state file: every run asks the server which hashes it has already
(`POST /v1/photos/lookup`) and sends only the others, so a second run of a finished folder uploads nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge.client import RETRIES, ApiError, ConcordClient
from edge.photos import photos_in

SPLIT_ON = (413, 415, 422)
"""Refusals of a whole batch that one bad photo causes: the batch is sent again photo by photo to find it."""


class IndexingError(RuntimeError):
    """A run that cannot start (no such folder, a batch size that is not positive)."""


@dataclass
class IndexReport:
    """What one run did."""

    found: int = 0
    indexed: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.found} photos: {self.indexed} indexed, {self.skipped} already on the server, "
                f"{self.duplicates} duplicates, {len(self.failed)} failed ({self.seconds:.1f} s, {rate:.1f} photos/s)")


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Indexer:
    """Uploads a folder to one server through the API client; `run` returns an IndexReport.

    A refusal of the whole run (401/403, a 5xx, an unreachable server after retries) raises `ApiError`; a
    refused photo is reported in `IndexReport.failed` and the run goes on.
    """

    def __init__(self, server: str, api_key: str | None = None, batch: int = 16, timeout: float = 120.0) -> None:
        if batch <= 0:
            raise IndexingError(f"--batch must be positive, got {batch}")
        self.client = ConcordClient(server, api_key, timeout, retries=RETRIES)
        self.batch = batch

    def close(self) -> None:
        self.client.close()

    def run(self, folder: Path, progress: bool = True) -> IndexReport:
        from tqdm import tqdm

        if not folder.is_dir():
            raise IndexingError(f"{folder}: no such folder")
        start = time.perf_counter()
        paths = photos_in(folder)
        report = IndexReport(found=len(paths))
        with tqdm(total=len(paths), unit="photo", desc="indexing", disable=not progress, smoothing=0.1) as bar:
            for batch in _batches(paths, self.batch):
                self._send_batch(folder, batch, report)
                bar.update(len(batch))
                bar.set_postfix(indexed=report.indexed, skipped=report.skipped, failed=len(report.failed))
        report.seconds = time.perf_counter() - start
        return report

    def _send_batch(self, root: Path, paths: list[Path], report: IndexReport) -> None:
        datas: dict[Path, bytes] = {}
        for path in paths:
            try:
                datas[path] = path.read_bytes()
            except OSError as err:
                report.failed.append((str(path), f"cannot read it ({err.strerror})"))
        hashes = {p: hashlib.sha256(d).hexdigest() for p, d in datas.items()}
        found = self.client.lookup(sorted(set(hashes.values())))
        todo = [p for p in datas if hashes[p] not in found]
        report.skipped += len(datas) - len(todo)
        if not todo:
            return
        try:
            answer = self.client.add_photos([(p.name, datas[p]) for p in todo],
                                            [{"path": p.relative_to(root).as_posix()} for p in todo])
        except ApiError as err:
            if err.status is None or err.status in (401, 403) or err.status >= 500:
                raise  # the server stops the whole run
            if err.status in SPLIT_ON and len(todo) > 1:
                for path in todo:  # one bad photo refuses a whole batch: send them one by one to find it
                    self._send_batch(root, [path], report)
                return
            report.failed += [(str(p), err.detail) for p in todo]
            return
        for photo in answer["photos"]:
            if photo["duplicate"]:
                report.duplicates += 1
            else:
                report.indexed += 1
