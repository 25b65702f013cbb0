"""The server's blocking work: decode and encode photos, store them, search, upgrade the indexing model.

Routes call these methods off the event loop (`run_in_threadpool`). Errors a client caused raise a
`ServiceError` subclass that carries its HTTP status and a message saying what was wrong, always BEFORE
anything is written: a refused request leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.gate import check_gate
from models.lineage import explain_incompatible, searchable_galleries
from models.manifest import Manifest, ModelEntry
from models.match import MATCHES, query_vectors
from models.preprocess import preprocess
from models.release import Release
from models.runtime import OnnxEncoder
from server.backfill import Backfill
from server.contract import (
    Added,
    Conflict,
    Limits,
    NotFound,
    SearchAnswer,
    SearchQuery,
    ServiceError,
    TooLarge,
    Unprocessable,
    Upload,
    check_vector,
    decode_photo,
    photo_pixels,
)
from server.metrics import Metrics
from server.opening import cloud_entry, gallery_name, keep_to_one_space, newest_cloud
from server.security import sniff_image
from server.settings import ACTIVE_MODEL_KEY, Settings
from server.store import Gallery, Hit, IndexSpec, NewPhoto, PhotoRecord
from server.store.backends import GalleryLocation, open_gallery
from server.vector_index import set_search_threads

log = logging.getLogger("concord.server")
ACTIVE_REFRESH_S = 1.0
"""How often the active model is re-read from the gallery: another server of the same (Milvus) gallery may have
upgraded it, and this one then indexes with the new model within about this long."""
ENCODE_BATCH = 16
"""Photos decoded, preprocessed and encoded together: only their small model inputs are held at once."""


class Service:
    """One release and one gallery store, with the active cloud model that indexes new photos."""

    def __init__(self, release: Release, store: Gallery, active_model: str, metrics: Metrics | None = None,
                 threads: int | None = None, limits: Limits | None = None, backfill_batch: int = ENCODE_BATCH,
                 backfill_claim: Path | None = None) -> None:
        self.release = release
        self.limits = limits or Limits()
        self._decode_slots = threading.BoundedSemaphore(self.limits.decode_slots)
        self.store = store
        self.metrics = metrics or Metrics()
        self.threads = threads
        self._active = active_model
        self._active_read = time.monotonic()
        self._refused_active: str | None = None
        self._upgrade_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._beside = ThreadPoolExecutor(max_workers=8, thread_name_prefix="concord-counts")
        self.encoded_photos = 0
        """Photos this process ran through an encoder (a test proves an upgrade adds none)."""
        manifest_file = Path(release.folder) / "manifest.json"
        self._manifest_digest = hashlib.sha256(manifest_file.read_bytes()).hexdigest() if manifest_file.exists() else ""
        self.metrics.set_gallery(store.counts())
        self.backfill = Backfill(self, backfill_batch, backfill_claim)

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics | None = None, shared: bool = False,
             resume: bool = True) -> Service:
        """Load and verify the release, open the store in `settings.data_dir`, settle the active model; `shared`:
        as one of the server's several worker processes; `resume`: go on with an unfinished backfill."""
        release = Release.load(settings.release, verify=settings.verify_release)
        set_search_threads(settings.faiss_threads)
        manifest = release.manifest
        wanted = settings.model or newest_cloud(manifest)
        entry = cloud_entry(manifest, wanted, "CONCORD_MODEL")
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        store = open_gallery(GalleryLocation.parse(settings.gallery), data_dir, entry.dim, IndexSpec(settings.index),
                             settings.keep_bytes, settings.milvus_token or "", settings.milvus_timeout,
                             snapshot_every=settings.snapshot_every, shared=shared)
        try:
            keep_to_one_space(store, entry, gallery_name(settings), settings.release)
            active = store.get_setting(ACTIVE_MODEL_KEY)
            if active is None:
                store.set_setting(ACTIVE_MODEL_KEY, wanted)
                active = wanted
            elif active not in manifest.models:
                raise ValueError(f"the store in {data_dir} indexes with {active!r}, which release {settings.release} "
                                 f"lacks (it holds {sorted(manifest.models)}); serve a release that has it")
            elif settings.model and settings.model != active:
                log.warning("CONCORD_MODEL=%s ignored: the store in %s indexes with %s; change it with "
                            "POST /v1/models/upgrade", settings.model, data_dir, active)
            release.encoder(str(active), threads=settings.threads)  # load it now: ready means ready to index
            limits = Limits(max_request_pixels=settings.max_request_pixels,
                            max_metadata_bytes=settings.max_metadata_bytes)
            service = cls(release, store, str(active), metrics, settings.threads, limits, settings.backfill_batch,
                          data_dir / "backfill.claim")
            if resume:
                service.backfill.resume()  # an unfinished backfill goes on in the background
            return service
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Stop a backfill between batches (the next start resumes it), save the FAISS index and close the store (a
        clean shutdown; a crash is recovered at the next start)."""
        self.backfill.close()
        self._beside.shutdown(wait=True)
        self.store.close()

    @property
    def manifest(self) -> Manifest:
        return self.release.manifest

    @property
    def release_name(self) -> str:
        """The release's name, or for an unnamed one the start of its manifest's sha256 (never a server path)."""
        return self.manifest.release or f"sha256:{self._manifest_digest[:12]}"

    @property
    def active_model(self) -> str:
        """The cloud model that encodes new photos: the gallery's, re-read every ACTIVE_REFRESH_S seconds."""
        if time.monotonic() - self._active_read >= ACTIVE_REFRESH_S and self._upgrade_lock.acquire(blocking=False):
            try:
                self._follow_gallery()
            finally:
                self._upgrade_lock.release()
        return self._active

    def _follow_gallery(self) -> None:
        """Take the gallery's active model when another server changed it (and this release holds it)."""
        stored = self.store.get_setting(ACTIVE_MODEL_KEY)
        self._active_read = time.monotonic()
        if stored is None or stored == self._active:
            return
        entry = self.manifest.models.get(stored)
        if entry is None or entry.role != "cloud":
            if stored != self._refused_active:  # said once per model, not every second
                self._refused_active = stored
                log.warning("the gallery's active model %r (set by another server) is not a cloud model of this "
                            "release; this server goes on indexing with %s", stored, self._active)
            return
        self.release.encoder(stored, threads=self.threads)
        log.info("active cloud model %s -> %s (set by another server of this gallery)", self._active, stored)
        self._active = stored

    # ----- photos -------------------------------------------------------------------------------------------

    def add_photos(self, uploads: list[Upload]) -> list[Added]:
        """Store photos, encoded by the active model; a photo whose sha256 is stored already is not stored again.

        Every photo is checked by its bytes and header (format, pixels) before any is decoded, then decoded and
        encoded ENCODE_BATCH at a time; nothing is stored until all are encoded: one bad photo refuses the whole
        request and names the file.
        """
        if not uploads:
            raise Unprocessable("no photos in the request: send one or more files in the multipart field 'files'")
        hashes = [hashlib.sha256(u.data).hexdigest() for u in uploads]
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        stored = {h: rec for h in first if (rec := self.store.find_by_hash(h)) is not None}
        todo = [i for h, i in first.items() if h not in stored]
        pixels = sum(photo_pixels(uploads[i].data, _name(uploads[i], i), self.limits.max_photo_pixels) for i in todo)
        if pixels > self.limits.max_request_pixels:
            raise TooLarge(f"the new photos of this request hold {pixels:,} pixels, above this server's budget of "
                           f"{self.limits.max_request_pixels:,} per request (CONCORD_MAX_REQUEST_PIXELS): send fewer "
                           f"photos per request")
        model_id = self.active_model
        vectors = self._encode_uploads(model_id, [(uploads[i].data, _name(uploads[i], i)) for i in todo])
        new = [NewPhoto(hashes[i], vectors[j], model_id, uploads[i].metadata, uploads[i].data)
               for j, i in enumerate(todo)]
        added = dict(zip([hashes[i] for i in todo], self.store.add(new) if new else [], strict=True))
        results = []
        for i, h in enumerate(hashes):
            if h in stored:
                results.append(Added(stored[h].id, stored[h].model_id, True, h))
            else:
                results.append(Added(added[h].id, added[h].model_id, added[h].duplicate or first[h] != i, h))
        fresh = [r for r in added.values() if not r.duplicate]
        if fresh:
            self.metrics.indexed.labels(model=model_id).inc(len(fresh))
            self.metrics.set_gallery(self.store.counts())
        self.metrics.duplicates.inc(len(results) - len(fresh))
        return results

    def lookup(self, hashes: list[str]) -> dict[str, int]:
        """The photo id of every given sha256 that is stored (unknown hashes are left out)."""
        found = {}
        for h in hashes:
            record = self.store.find_by_hash(h.lower())
            if record is not None:
                found[h] = record.id
        return found

    def record(self, photo_id: int) -> PhotoRecord:
        record = self.store.get(photo_id)
        if record is None:
            raise NotFound(f"no photo with id {photo_id}")
        return record

    def image(self, photo_id: int) -> tuple[bytes, str]:
        """A stored photo's bytes and its media type (judged by its bytes)."""
        self.record(photo_id)
        data = self.store.photo_bytes(photo_id)
        if data is None:
            raise NotFound(f"photo {photo_id} is indexed but its bytes were not kept (CONCORD_KEEP_BYTES=false)")
        return data, sniff_image(data) or "application/octet-stream"

    def delete(self, photo_id: int) -> None:
        """Remove a photo: its row, its vector and (when no other photo shares them) its bytes."""
        if not self.store.delete(photo_id):
            raise NotFound(f"no photo with id {photo_id}")
        self.metrics.set_gallery(self.store.counts())

    # ----- search -------------------------------------------------------------------------------------------

    def search_vector(self, values: list[float] | np.ndarray, model_id: str, query: SearchQuery,
                      kind: str = "embedding") -> SearchAnswer:
        """Search with an embedding made by `model_id`, over every gallery model it is comparable with."""
        entry = self._query_entry(model_id)
        vector = self._match(check_vector(values, entry), entry, query.match)
        # On a remote gallery the counts (which models hold vectors) and the search are a round trip each: they
        # run at once, the search over every model the release lets `model_id` search (hits come only from
        # models holding vectors, so the answer is the same as searching `searched` after the counts).
        galleries = self._beside.submit(self._galleries, model_id) if self.store.remote else None
        start = time.perf_counter()
        if galleries is None:
            searched, skipped = self._galleries(model_id)
            hits = self._search(vector, searched, query) if searched else []
        else:
            hits = self._search(vector, searchable_galleries(self.manifest, model_id), query, galleries)
            searched, skipped = galleries.result()
        if searched:
            self.metrics.search_seconds.observe(time.perf_counter() - start)
        self.metrics.searches.labels(kind=kind, model=model_id).inc()
        return SearchAnswer(model_id, searched, skipped, hits)

    def _search(self, vector: np.ndarray, models: list[str], query: SearchQuery,
                galleries: Future[tuple[list[str], dict[str, str]]] | None = None) -> list[Hit]:
        """The store's search; a refused one is a 422, after any 409 the gallery counts in flight raise."""
        try:
            return self.store.search(vector, k=query.k, offset=query.offset, models=models, where=query.where,
                                     added_after=query.added_after, added_before=query.added_before)
        except ValueError as err:
            if galleries is not None:
                galleries.result()
            raise Unprocessable(str(err)) from None

    def search_photo(self, data: bytes, query: SearchQuery, filename: str = "photo") -> SearchAnswer:
        """Encode a query photo with the active cloud model and search with it."""
        model_id = self.active_model
        photo_pixels(data, filename, self.limits.max_photo_pixels)
        vector = self._encode_uploads(model_id, [(data, filename)])[0]
        return self.search_vector(vector, model_id, query, kind="photo")

    def similar(self, photo_id: int, query: SearchQuery) -> SearchAnswer:
        """More like this: search with a stored photo's own vector and model; the photo itself is left out."""
        record = self.record(photo_id)
        vector = self.store.vector(photo_id)
        if vector is None:
            raise NotFound(f"photo {photo_id} has no vector")
        wider = replace(query, k=query.offset + query.k + 1, offset=0)
        answer = self.search_vector(vector, record.model_id, wider, kind="similar")
        hits = [h for h in answer.hits if h.id != photo_id][query.offset:query.offset + query.k]
        return SearchAnswer(answer.query_model, answer.searched, answer.skipped, hits)

    def _match(self, vector: np.ndarray, entry: ModelEntry, match: str) -> np.ndarray:
        """The query vector re-weighted for `match` (the one place it happens; stored vectors are never touched);
        422 for an unknown match or `duplicate` in a space without a photo fingerprint."""
        try:
            return query_vectors(vector, self.manifest.spaces[entry.space], match)
        except ValueError as err:
            raise Unprocessable(str(err)) from None

    def _query_entry(self, model_id: str) -> ModelEntry:
        if model_id not in self.manifest.models:
            raise Conflict(f"unknown query model {model_id!r}: this server's release "
                           f"{self.release_name} holds {sorted(self.manifest.models)}; "
                           f"query with one of them, or give the server a release that has {model_id!r}")
        return self.manifest.model(model_id)

    def _galleries(self, model_id: str) -> tuple[list[str], dict[str, str]]:
        """Gallery models `model_id` may search (those holding vectors) and the skipped ones with why."""
        counts = {m: n for m, n in self.store.counts().items() if n > 0}
        searched, skipped = [], {}
        for gallery in sorted(counts):
            reason = explain_incompatible(self.manifest, model_id, gallery)
            if reason:
                skipped[gallery] = reason
            else:
                searched.append(gallery)
        if not searched:
            target = sorted(counts)[0] if counts else self._active
            reason = skipped.get(target) or explain_incompatible(self.manifest, model_id, target)
            if reason:
                raise Conflict(f"query model {model_id!r} cannot search this gallery: {reason}",
                               gallery_models=sorted(counts) or [self._active])
        return searched, skipped

    # ----- models -------------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """The release: spaces, models with lineage and figures, who may search whom, the active model."""
        manifest, active = self.manifest, self.active_model
        counts = self.store.counts()
        models = []
        for entry in sorted(manifest.models.values(), key=lambda e: (e.space, e.role, e.version, e.id)):
            models.append({
                "id": entry.id, "role": entry.role, "space": entry.space, "dim": entry.dim, "version": entry.version,
                "parents": list(entry.parents), "arch": entry.arch, "active": entry.id == active,
                "gallery_vectors": counts.get(entry.id, 0),
                "searches": searchable_galleries(manifest, entry.id),
                "preprocess": entry.preprocess.to_dict(), "files": sorted(entry.files()),
                "metrics": entry.metrics, "card": entry.card,
            })
        spaces = [{"id": s.id, "dim": s.dim, "metric": s.metric,
                   "fingerprint": vars(s.fingerprint).copy() if s.fingerprint else None,
                   "matches": list(MATCHES) if s.fingerprint else ["similar"],
                   "models": sorted(e.id for e in manifest.models.values() if e.space == s.id)}
                  for s in manifest.spaces.values()]
        lineage = [{"model": e.id, "parent": p} for e in manifest.models.values() for p in e.parents]
        return {"release": self.release_name, "active_model": active, "spaces": spaces, "models": models,
                "lineage": lineage}

    def upgrade(self, model_id: str) -> dict[str, Any]:
        """Make a newer cloud model index new photos, after the compatibility gate; nothing is re-encoded.

        Stored vectors stay as they are and stay searchable (the gate proved the new model's queries beat the
        old model's on the old gallery). Raises NotFound, Unprocessable (not a cloud model) or Conflict
        (older, another space, or failing the gate: it could only start a new space, which needs a backfill; or
        while a backfill runs, which re-encodes with the active model).
        """
        with self._upgrade_lock:
            start = time.perf_counter()
            self._follow_gallery()
            previous = self._active
            if model_id not in self.manifest.models:
                raise NotFound(f"unknown model {model_id!r}: this release holds {sorted(self.manifest.models)}")
            entry = self.manifest.model(model_id)
            if entry.role != "cloud":
                raise Unprocessable(f"{model_id!r} is an {entry.role} model: only a cloud model indexes photos "
                                    f"(devices query with edge models; they need no server upgrade)")
            if self.backfill.busy:
                raise Conflict(f"refusing to change the active model while a backfill to {previous!r} runs: wait for "
                               f"it (GET /v1/backfill), then upgrade", active_model=previous)
            if model_id == previous:
                return self._upgrade_answer(previous, model_id, None, start, changed=False)
            verdict = check_gate(self.manifest, model_id, previous)
            if not verdict.passed:
                raise Conflict(f"refusing to index with {model_id!r}: {verdict.reason}", gate=verdict.to_dict(),
                               active_model=previous)
            self.release.encoder(model_id, threads=self.threads)  # load (and sha256-check) it before switching
            self.store.set_setting(ACTIVE_MODEL_KEY, model_id)
            self._active = model_id
            self._active_read = time.monotonic()
            self.metrics.upgrades.inc()
            log.info("active cloud model %s -> %s (%s)", previous, model_id, verdict.reason)
            return self._upgrade_answer(previous, model_id, verdict.to_dict(), start, changed=True)

    def _upgrade_answer(self, previous: str, active: str, gate: dict[str, Any] | None, start: float,
                        changed: bool) -> dict[str, Any]:
        counts = self.store.counts()
        message = (f"{active!r} now indexes new photos; the {sum(counts.values())} stored vectors stay as they are "
                   f"and stay searchable" if changed else f"{active!r} is already the active model; nothing changed")
        return {"previous": previous, "active_model": active, "changed": changed, "gate": gate,
                "reencoded": 0,  # by construction: an upgrade has no re-encoding step (a test counts encoder calls)
                "seconds": round(time.perf_counter() - start, 6),
                "gallery": counts, "message": message}

    def stats(self, verify: bool = False) -> dict[str, Any]:
        """Photos, vectors per model, the active model, photos encoded by this process; with `verify`, also
        whether the FAISS index holds exactly the catalogue's ids (reads every id: for checks, not dashboards)."""
        counts = self.store.counts()
        answer: dict[str, Any] = {"photos": len(self.store), "vectors": counts, "vectors_total": sum(counts.values()),
                                  "active_model": self.active_model, "release": self.release_name,
                                  "encoded_photos": self.encoded_photos}
        if verify:
            catalogue, index = self.store.catalogue_ids(), self.store.index_ids()
            answer.update(catalogue_rows=len(catalogue), index_vectors=len(index), consistent=catalogue == index)
        return answer

    # ----- backfill ----------------------------------------------------------------------------------------

    def start_backfill(self, share: float = 1.0) -> dict[str, Any]:
        """Start re-encoding the stored photos of older models with the active one, in the background (see
        `server.backfill`); `share` in (0, 1] stops after that share of them. 409 while one runs, or when the
        active model is not a cloud model of this release."""
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise Unprocessable(f"share must be a number in (0, 1] (the part of the photos to re-encode), not {share}")
        with self._upgrade_lock:  # no upgrade between reading the active model and starting the job
            self._follow_gallery()
            entry = self.manifest.models.get(self._active)
            if entry is None or entry.role != "cloud":
                raise Conflict(f"the active model {self._active!r} is not a cloud model of release "
                               f"{self.release_name}: a backfill re-encodes with the active cloud model")
            return self.backfill.start(self._active, float(share))

    def backfill_status(self) -> dict[str, Any]:
        """The backfill job: state, target model, counts, rate and ETA (the last job, once it ended)."""
        return self.backfill.status()

    def backfilled(self, model_id: str, count: int) -> None:
        """Count photos a backfill re-encoded with `model_id`, and publish the gallery's new counts."""
        if count:
            self.metrics.backfilled.labels(model=model_id).inc(count)
            self.metrics.set_gallery(self.store.counts())

    # ----- encoding -----------------------------------------------------------------------------------------

    def _encode_uploads(self, model_id: str, photos: list[tuple[bytes, str]]) -> np.ndarray:
        """Decode, preprocess and encode photos ENCODE_BATCH at a time, one full-size decode per slot at once."""
        encoder = self.release.encoder(model_id, threads=self.threads)
        chunks = [np.zeros((0, encoder.dim), dtype=np.float32)]
        for first in range(0, len(photos), ENCODE_BATCH):
            start = time.perf_counter()
            inputs = [self._model_input(data, name, encoder) for data, name in photos[first:first + ENCODE_BATCH]]
            chunks.append(self._encode_inputs(model_id, encoder, inputs, start))
        return np.concatenate(chunks)

    def encode_stored(self, model_id: str, photos: list[tuple[int, bytes]]) -> tuple[list[int], np.ndarray,
                                                                                     list[tuple[int, str]]]:
        """Encode stored photos (a backfill): the ids and vectors of those that decode, and (id, why) of those that
        do not (reported, not raised: one bad photo never stops a backfill)."""
        encoder = self.release.encoder(model_id, threads=self.threads)
        ids, chunks, failed = [], [np.zeros((0, encoder.dim), dtype=np.float32)], []
        for first in range(0, len(photos), ENCODE_BATCH):
            start = time.perf_counter()
            inputs = []
            for photo_id, data in photos[first:first + ENCODE_BATCH]:
                try:
                    inputs.append(self._model_input(data, f"photo {photo_id}", encoder))
                    ids.append(photo_id)
                except ServiceError as err:
                    failed.append((photo_id, err.message))
            if inputs:
                chunks.append(self._encode_inputs(model_id, encoder, inputs, start))
        return ids, np.concatenate(chunks), failed

    def _model_input(self, data: bytes, name: str, encoder: OnnxEncoder) -> np.ndarray:
        """One photo decoded and preprocessed, in a decode slot (its full-size pixels live only inside it)."""
        with self._decode_slots:
            return preprocess(decode_photo(data, name), encoder.preprocess)

    def _encode_inputs(self, model_id: str, encoder: OnnxEncoder, inputs: list[np.ndarray],
                       start: float) -> np.ndarray:
        """Encode preprocessed photos as one batch and count them (metrics, `encoded_photos`)."""
        vectors: np.ndarray = encoder.encode_arrays(np.stack(inputs))
        self.metrics.encode_seconds.labels(model=model_id).observe(time.perf_counter() - start)
        self.metrics.encoded.labels(model=model_id).inc(len(inputs))
        with self._count_lock:
            self.encoded_photos += len(inputs)
        return vectors


def _name(upload: Upload, index: int) -> str:
    return f"file #{index} ({upload.filename!r})" if upload.filename else f"file #{index}"
