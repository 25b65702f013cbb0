"""Bulk indexing client: walk a folder, skip what the server holds (by sha256), upload the rest in batches.

Resuming after an interruption needs no state file: every run asks the server which hashes it has already
(`POST /v1/photos/lookup`) and sends only the others, so a second run of a finished folder uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
RETRIES = 3
"""Attempts per request when the server cannot be reached (it may be restarting)."""


class IndexingError(RuntimeError):
    """The server refused the whole run (bad URL, wrong API key) or could not be reached."""


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


def find_photos(folder: Path) -> list[Path]:
    """Every photo file under `folder` (by suffix, any case), sorted so runs go in the same order."""
    if not folder.is_dir():
        raise IndexingError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Indexer:
    """Uploads a folder to one server; `run` returns an IndexReport."""

    def __init__(self, server: str, api_key: str | None = None, batch: int = 16, timeout: float = 120.0) -> None:
        if not server.startswith(("http://", "https://")):
            raise IndexingError(f"server URL must start with http:// or https://, got {server!r}")
        if batch <= 0:
            raise IndexingError(f"--batch must be positive, got {batch}")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.server = server.rstrip("/")
        self.batch = batch
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def run(self, folder: Path, progress: bool = True) -> IndexReport:
        from tqdm import tqdm

        start = time.perf_counter()
        paths = find_photos(folder)
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
        found = self._request("POST", "/v1/photos/lookup", json={"hashes": sorted(set(hashes.values()))}).json()
        todo = [p for p in datas if hashes[p] not in found["found"]]
        report.skipped += len(datas) - len(todo)
        if not todo:
            return
        response = self._upload(root, todo, datas)
        if response.status_code in (413, 415, 422) and len(todo) > 1:
            for path in todo:  # one bad photo refuses a whole batch: send them one by one to find it
                self._send_batch(root, [path], report)
            return
        if response.status_code >= 400:
            report.failed += [(str(p), _message(response)) for p in todo]
            return
        for photo in response.json()["photos"]:
            if photo["duplicate"]:
                report.duplicates += 1
            else:
                report.indexed += 1

    def _upload(self, root: Path, paths: list[Path], datas: dict[Path, bytes]) -> httpx.Response:
        files = [("files", (p.name, datas[p], "application/octet-stream")) for p in paths]
        metadata = [{"path": p.relative_to(root).as_posix()} for p in paths]
        return self._request("POST", "/v1/photos", files=files, data={"metadata": json.dumps(metadata)},
                             allow_client_errors=True)

    def _request(self, method: str, path: str, allow_client_errors: bool = False, **kwargs: Any) -> httpx.Response:
        """Send one request, retrying when the server is unreachable; raise on 401/403/5xx (they stop the run)."""
        for attempt in range(RETRIES):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if attempt == RETRIES - 1:
                    raise IndexingError(f"cannot reach the server at {self.server} ({err})") from None
                time.sleep(0.5 * 2 ** attempt)
                continue
            if response.status_code in (401, 403) or response.status_code >= 500 or (
                    response.status_code >= 400 and not allow_client_errors):
                raise IndexingError(f"{method} {self.server}{path}: the server answered {response.status_code}: "
                                  f"{_message(response)}")
            return response
        raise AssertionError("unreachable")


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:300]
