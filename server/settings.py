"""Server settings: one frozen dataclass, read from `CONCORD_*` environment variables and the command line.

Every field `name` has the variable `CONCORD_<NAME>` (e.g. `CONCORD_DATA_DIR`, `CONCORD_API_KEY`); values
given on the command line win over the environment, which wins over the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from models.release import SHIPPED_RELEASE
from server.store.backends import GalleryLocation

PREFIX = "CONCORD_"
ACTIVE_MODEL_KEY = "active_cloud_model"
SPACE_KEY = "space"
"""The gallery setting naming the embedding space of its vectors (recorded when a release first serves it)."""
LEGACY_SPACE = "concord"
"""The space of a gallery that holds vectors but recorded no space: every release until spaces were recorded
embedded into it."""
"""The store setting that records which cloud model indexes new photos (durable across restarts)."""
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its environment variable."""


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs. Paths are resolved when the app starts, not here."""

    release: Path = SHIPPED_RELEASE
    """Release folder: manifest.json and the ONNX files it names (sha256-verified at start)."""
    data_dir: Path = Path("concord-data")
    """Where the embedded gallery store (SQLite catalogue, FAISS index, photo bytes) lives."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """Key required in `X-API-Key` (or `Authorization: Bearer`) for writes; None leaves writes open."""
    auth_reads: bool = False
    """Require the API key for reads (search, photos, models, stats) too."""
    model: str | None = None
    """Cloud model that indexes photos in a NEW store (default: the newest cloud model). A store remembers its
    active model; change it later only through `POST /v1/models/upgrade`."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted; a larger one gets 413 before it is read."""
    max_files: int = 256
    """Most photos in one upload."""
    max_request_pixels: int = 512_000_000
    """Pixels (by their headers) of all new photos of one upload: bounds its CPU time; more gets 413."""
    max_metadata_bytes: int = 4096
    """JSON size of one photo's metadata; more gets 413 (one object given for all files counts once per file)."""
    snapshot_every: int = 1000
    """Changes after which the FAISS index snapshot is rewritten in the background (0: only at shutdown): a crash
    after long uptime replays at most about this many changes at the next start."""
    backfill_batch: int = 16
    """Photos a backfill re-encodes and swaps at a time: a shutdown stops it between two batches, and its
    progress is recorded after each."""
    keep_bytes: bool = True
    """Keep each photo's bytes (content-addressed): without them no later backfill is possible."""
    index: str = "flat"
    """Index kind of the gallery (see `server.store.IndexSpec`): FAISS's for the embedded store; for Milvus the
    same names map to FLAT, HNSW (M, ef_construction, ef_search) and IVF_FLAT (nlist, nprobe)."""
    gallery: str = "embedded"
    """Gallery backend: embedded (SQLite + FAISS in the data folder), milvus://host:19530[/collection] or
    milvus-lite:./gallery.db[/collection] (see `server.store.backends`)."""
    milvus_token: str | None = None
    """Token for a Milvus that requires one ("user:password" or an API key)."""
    milvus_timeout: int = 60
    """Seconds to keep trying to reach Milvus at start (a Milvus restarting after a crash can take a minute)."""
    threads: int | None = None
    """onnxruntime intra-op threads per encoder (None: one per core)."""
    faiss_threads: int = 1
    """FAISS threads per search. One: a batch-1 flat search over 1M vectors took 143 ms on one thread and 216 ms
    on FAISS's default (one per core) on two busy cores; concurrent requests use the other cores instead."""
    workers: int = 1
    """Server processes answering on the port together, over one store: each holds its own copy of the index and
    the models (memory grows with each), and searches use one core per worker."""
    verify_release: bool = True
    """Check every release file's sha256 at start."""
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("port", "max_request_bytes", "max_files", "max_request_pixels", "max_metadata_bytes",
                     "faiss_threads", "milvus_timeout", "backfill_batch", "workers"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()}: must be a positive integer, got {getattr(self, name)}")
        if self.snapshot_every < 0:
            raise SettingsError(f"{PREFIX}SNAPSHOT_EVERY: must be 0 (only at shutdown) or positive, got "
                                f"{self.snapshot_every}")
        if self.threads is not None and self.threads <= 0:
            raise SettingsError(f"{PREFIX}THREADS: must be a positive integer, got {self.threads}")
        try:
            location = GalleryLocation.parse(self.gallery)
        except ValueError as err:
            raise SettingsError(f"{PREFIX}GALLERY: {err}") from None
        if self.workers > 1 and location.kind == "milvus-lite":
            raise SettingsError(f"{PREFIX}WORKERS: Milvus Lite keeps its file in one process; serve it with one "
                                f"worker, or use a Milvus server (milvus://host:19530) or the embedded store")
        if self.api_key is not None and not self.api_key.strip():
            raise SettingsError(f"{PREFIX}API_KEY: must not be blank (unset it to leave writes open)")

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied; None values are ignored (an option not given on the command line)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `CONCORD_*` variables of `environ` (default: os.environ), then non-None `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        return cls(**values).replace(**overrides)


def _parse(name: str, kind: str, raw: str) -> Any:
    """Turn the text of `CONCORD_<NAME>` into the field's type, naming the variable when it cannot."""
    var = PREFIX + name.upper()
    optional = "None" in kind
    if optional and raw.strip() == "":
        return None
    if "Path" in kind:
        return Path(raw).expanduser()
    if "bool" in kind:
        if raw.strip().lower() in TRUE:
            return True
        if raw.strip().lower() in FALSE:
            return False
        raise SettingsError(f"{var}: expected true/false (1/0, yes/no, on/off), got {raw!r}")
    if "int" in kind:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{var}: expected an integer, got {raw!r}") from None
    return raw
