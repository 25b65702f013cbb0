"""Which gallery backend serves: the `--gallery` setting parsed, and the one place a backend is opened.

    embedded (default)                 SQLite + FAISS in `<data-dir>/gallery` (one process per folder)
    milvus://host:19530[/collection]   a Milvus standalone server or cluster; photo bytes in `<data-dir>/photos`
    milvus-lite:./gallery.db[/collection]  Milvus Lite, embedded in a local file (one process; tests, small setups)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.store.catalogue import recorded_dim
from server.store.gallery import GalleryStore
from server.store.interface import Gallery
from server.store.recovery import SNAPSHOT_EVERY
from server.vector_index import IndexSpec

DEFAULT_COLLECTION = "concord"
EXAMPLES = "embedded, milvus://host:19530[/collection] or milvus-lite:./gallery.db[/collection]"


@dataclass(frozen=True)
class GalleryLocation:
    """Where the gallery lives: `kind` embedded | milvus | milvus-lite, the Milvus `uri` and `collection`."""

    kind: str = "embedded"
    uri: str = ""
    collection: str = DEFAULT_COLLECTION

    @classmethod
    def parse(cls, text: str) -> GalleryLocation:
        """Read a `--gallery` value; ValueError naming the accepted forms."""
        text = text.strip()
        if text in ("", "embedded"):
            return cls()
        if text.startswith("milvus://"):
            rest = text.removeprefix("milvus://")
            address, _, collection = rest.partition("/")
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"gallery {text!r}: a Milvus server is milvus://host:port, e.g. "
                                 f"milvus://127.0.0.1:19530")
            return cls("milvus", f"http://{host}:{port}", _collection(collection, text))
        if text.startswith("milvus-lite:"):
            rest = text.removeprefix("milvus-lite:")
            path, collection = rest, ""
            if not rest.endswith(".db"):
                path, _, collection = rest.rpartition("/")
            if not path.endswith(".db"):
                raise ValueError(f"gallery {text!r}: Milvus Lite needs a file ending in .db, e.g. "
                                 f"milvus-lite:./gallery.db")
            return cls("milvus-lite", str(Path(path).expanduser().resolve()), _collection(collection, text))
        raise ValueError(f"unknown gallery {text!r}: use {EXAMPLES}")

    def __str__(self) -> str:
        if self.kind == "embedded":
            return "embedded"
        if self.kind == "milvus":
            return f"milvus://{self.uri.removeprefix('http://')}/{self.collection}"
        return f"milvus-lite:{self.uri}/{self.collection}"


def _collection(name: str, text: str) -> str:
    name = name.strip("/") or DEFAULT_COLLECTION
    if not name.replace("_", "a").isalnum() or not name[0].isalpha():
        raise ValueError(f"gallery {text!r}: a collection name is letters, digits and _ (starting with a letter)")
    return name


def open_gallery(location: GalleryLocation, data_dir: Path, dim: int, index: IndexSpec, keep_bytes: bool,
                 token: str = "", timeout: float = 60.0, *, snapshot_every: int = SNAPSHOT_EVERY,
                 shared: bool = False) -> Gallery:
    """Open the gallery at `location` for `dim`-dim vectors (photo bytes under `data_dir` for Milvus); `shared`: by
    one of several worker processes (a Milvus gallery is always shared)."""
    if location.kind == "embedded":
        return GalleryStore(Path(data_dir) / "gallery", dim=dim, index=index, keep_bytes=keep_bytes,
                            snapshot_every=snapshot_every, shared=shared)
    from server.store.milvus import MilvusGallery

    if location.kind == "milvus-lite":
        Path(location.uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusGallery(location.uri, location.collection, dim, Path(data_dir) / "photos", index,
                         keep_bytes, token=token, connect_timeout=timeout)


def gallery_dim(location: GalleryLocation, data_dir: Path, token: str = "", timeout: float = 60.0) -> int | None:
    """The dim the gallery was made for, or None when it holds none yet (read without opening it)."""
    if location.kind == "embedded":
        return recorded_dim(Path(data_dir) / "gallery")
    if location.kind == "milvus-lite" and not Path(location.uri).exists():
        return None
    from server.store.milvus_client import collection_dim, connect, release_lite

    client = connect(location.uri, token, timeout)
    try:
        return collection_dim(client, location.collection) if client.has_collection(location.collection) else None
    finally:
        client.close()
        release_lite(location.uri)
