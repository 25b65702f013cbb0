"""Reaching Milvus and shaping its collections: the client with retries, the collections' schema, index
parameters from a gallery index spec, and filter literals (the `MilvusGallery` in `milvus` uses them)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from server.vector_index import IndexSpec

log = logging.getLogger("concord.store")


class MilvusUnavailable(RuntimeError):
    """Milvus cannot be reached or did not answer; the message says where and what to do."""


def milvus_index(spec: IndexSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Milvus index and search parameters for a gallery index spec: flat -> FLAT, hnsw -> HNSW, ivf -> IVF_FLAT."""
    if spec.kind == "hnsw":
        return ({"index_type": "HNSW", "params": {"M": spec.get("M"), "efConstruction": spec.get("ef_construction")}},
                {"ef": spec.get("ef_search")})
    if spec.kind == "ivf":
        return {"index_type": "IVF_FLAT", "params": {"nlist": spec.get("nlist")}}, {"nprobe": spec.get("nprobe")}
    return {"index_type": "FLAT", "params": {}}, {}


def literal(value: Any) -> str:
    """A Milvus expression literal for a JSON value (strings quoted and escaped as JSON does)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def ensure_collections(client: Any, uri: str, collection: str, settings_collection: str, dim: int,
                       spec: IndexSpec) -> None:
    """Create the gallery and settings collections when missing (refusing a gallery made for another dim) and
    load both."""
    from pymilvus import DataType

    if client.has_collection(collection):
        stored = collection_dim(client, collection)
        if stored != dim:
            raise ValueError(f"Milvus collection {collection!r} at {uri} holds {stored}-dim vectors; "
                             f"this release embeds into {dim} (a model of another dim needs its own "
                             f"collection)")
    else:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("model_id", DataType.VARCHAR, max_length=512)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("added_at", DataType.DOUBLE)
        schema.add_field("has_bytes", DataType.BOOL)
        params = client.prepare_index_params()
        index, _ = milvus_index(spec)
        params.add_index("vector", metric_type="IP", **index)
        client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")
        log.info("created Milvus collection %r at %s (%d dims, %s index)", collection, uri, dim,
                 index["index_type"])
    if not client.has_collection(settings_collection):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("value", DataType.VARCHAR, max_length=65535)
        schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field per collection
        params = client.prepare_index_params()
        params.add_index("dummy", index_type="FLAT", metric_type="L2")
        client.create_collection(settings_collection, schema=schema, index_params=params,
                                 consistency_level="Strong")
    client.load_collection(collection)
    client.load_collection(settings_collection)


def connect(uri: str, token: str = "", timeout: float = 60.0) -> Any:
    """A MilvusClient for `uri`, retrying until `timeout` (each failed try is logged); MilvusUnavailable after."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise MilvusUnavailable("the Milvus gallery needs pymilvus (and milvus-lite for a local .db): "
                                "pip install 'concord[milvus]'") from None
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            client = MilvusClient(uri=uri, token=token, timeout=min(10.0, max(1.0, timeout)))
            client.list_collections()
            if attempt > 1:
                log.warning("Milvus at %s answered after %d attempts", uri, attempt)
            return client
        except (MilvusException, OSError, RuntimeError) as err:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MilvusUnavailable(f"cannot reach Milvus at {uri} after {attempt} attempts in {timeout:.0f} s "
                                        f"({str(err).strip()[:200]}): start Milvus there, or pass another "
                                        f"--gallery / CONCORD_GALLERY") from None
            log.warning("Milvus at %s is not answering (attempt %d: %s); retrying for %.0f s more", uri, attempt,
                        str(err).strip()[:200], left)
            time.sleep(min(2.0, max(0.1, left)))


def release_lite(uri: str) -> None:
    """Stop this process's Milvus Lite engine of a `.db` file, dropping its file lock (other URIs: nothing)."""
    if not uri.endswith(".db"):
        return
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)


def collection_dim(client: Any, collection: str) -> int | None:
    """The vector dim of a collection, or None when it has no vector field named `vector`."""
    for field in client.describe_collection(collection)["fields"]:
        if field["name"] == "vector":
            return int(field["params"]["dim"])
    return None
