"""Which gallery a release may serve and with which model: the checks before anything loads and at open, and
what a release's first start records in a new gallery (its vectors' space and the indexing model)."""

from __future__ import annotations

from pathlib import Path

from models.manifest import Manifest, ModelEntry
from server.settings import ACTIVE_MODEL_KEY, LEGACY_SPACE, SPACE_KEY, Settings
from server.store import Gallery
from server.store.backends import GalleryLocation, gallery_dim
from server.store.catalogue import recorded_settings


def check_store_fits(settings: Settings) -> None:
    """Refuse, before anything loads, a store made for vectors of another dim or (embedded) space than the
    release's; a Milvus gallery's space is checked when it opens."""
    manifest = Manifest.load(settings.release)
    entry = cloud_entry(manifest, settings.model or newest_cloud(manifest), "CONCORD_MODEL")
    stored = gallery_dim(GalleryLocation.parse(settings.gallery), Path(settings.data_dir), settings.milvus_token or "",
                         settings.milvus_timeout)
    if stored is not None and stored != entry.dim:
        raise ValueError(f"the {gallery_name(settings)} holds {stored}-dim vectors, but release "
                         f"{settings.release} embeds into {entry.dim} dims (space {entry.space!r}): serve that store "
                         f"with the release that made it, or give this release its own --data-dir / CONCORD_DATA_DIR")
    if GalleryLocation.parse(settings.gallery).kind == "embedded":
        photos, recorded = recorded_settings(Path(settings.data_dir) / "gallery")
        _check_space(recorded.get(SPACE_KEY), photos or ACTIVE_MODEL_KEY in recorded, entry, gallery_name(settings),
                     settings.release)


def start_gallery(store: Gallery, space: str, model_id: str) -> None:
    """Record in a new gallery what a release's first start records: its vectors' space and the indexing model
    (benchmarks that fill a store directly call it, so that `concord serve` opens it as its own)."""
    store.set_setting(SPACE_KEY, space)
    store.set_setting(ACTIVE_MODEL_KEY, model_id)


def keep_to_one_space(store: Gallery, entry: ModelEntry, name: str, release: object) -> None:
    """Refuse a gallery whose vectors are of another space than `entry`'s (a gallery that holds vectors but
    recorded no space is LEGACY_SPACE's); record the space in a gallery that has none yet."""
    recorded = store.get_setting(SPACE_KEY)
    _check_space(recorded, len(store) > 0 or store.get_setting(ACTIVE_MODEL_KEY) is not None, entry, name, release)
    if recorded is None:
        store.set_setting(SPACE_KEY, entry.space)


def _check_space(recorded: str | None, used: bool, entry: ModelEntry, name: str, release: object) -> None:
    """Refuse unless the gallery's space is `entry`'s: the recorded space, else LEGACY_SPACE for a gallery an older
    release used (it holds photos or an active model), else none yet (a new gallery)."""
    stored = recorded or (LEGACY_SPACE if used else None)
    if stored is not None and stored != entry.space:
        raise ValueError(f"the {name} holds vectors of space {stored!r}, but release {release} embeds into space "
                         f"{entry.space!r}: vectors of two spaces cannot be compared; serve that store with the "
                         f"release that made it, or give this release its own --data-dir / CONCORD_DATA_DIR")


def gallery_name(settings: Settings) -> str:
    """The gallery as a message names it: the data folder for the embedded store, else the Milvus location."""
    location = GalleryLocation.parse(settings.gallery)
    return f"store in {settings.data_dir}" if location.kind == "embedded" else f"Milvus gallery {location}"


def newest_cloud(manifest: Manifest) -> str:
    """The cloud model of highest version: what a new store indexes with unless told otherwise."""
    if not manifest.of_role("cloud"):
        raise ValueError(f"release {manifest.release!r} holds no cloud model to index photos with")
    return manifest.newest("cloud").id


def cloud_entry(manifest: Manifest, model_id: str, setting: str) -> ModelEntry:
    if model_id not in manifest.models:
        raise ValueError(f"{setting}: unknown model {model_id!r}; the release holds {sorted(manifest.models)}")
    entry = manifest.model(model_id)
    if entry.role != "cloud":
        raise ValueError(f"{setting}: {model_id!r} is an {entry.role} model; photos are indexed by a cloud model")
    return entry
