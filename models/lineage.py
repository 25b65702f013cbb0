"""Spaces and lineage: which model's queries may search which model's gallery vectors.

Rule: query model q may search gallery vectors of model g when both are in one space AND they are
joined by lineage, i.e. their lineages meet: one is an ancestor of the other, or they share an ancestor
(e.g. edge-v1 and cloud-v2 both descend from cloud-v1, so a late device still searches a gallery that the
upgrade mixed). An edge model and the cloud model it was trained toward are joined (the cloud is its
parent). Plain connectivity of the lineage graph is deliberately NOT enough: a model with two parents
from independent roots would otherwise make those two unrelated roots comparable.
"""

from __future__ import annotations

from models.manifest import Manifest


def lineage(manifest: Manifest, model_id: str) -> set[str]:
    """Every ancestor of `model_id` (its parents, their parents, ...), without the model itself."""
    return manifest.ancestors(model_id)


def family(manifest: Manifest, model_id: str) -> set[str]:
    """The model and its ancestors."""
    return lineage(manifest, model_id) | {model_id}


def roots(manifest: Manifest, model_id: str) -> set[str]:
    """The ancestors (or the model itself) that have no parents: where its lineage starts."""
    return {m for m in family(manifest, model_id) if not manifest.model(m).parents}


def comparable(manifest: Manifest, query_id: str, gallery_id: str) -> bool:
    """Whether embeddings of `query_id` may be searched against gallery vectors of `gallery_id`."""
    return not explain_incompatible(manifest, query_id, gallery_id)


def explain_incompatible(manifest: Manifest, query_id: str, gallery_id: str) -> str:
    """Why `query_id` may not search `gallery_id`'s vectors (the API's 409 message); "" when it may."""
    for role, model_id in (("query", query_id), ("gallery", gallery_id)):
        if model_id not in manifest.models:
            return (f"unknown {role} model {model_id!r}: this release holds {sorted(manifest.models)}")
    query, gallery = manifest.model(query_id), manifest.model(gallery_id)
    if query.space != gallery.space:
        return (f"{query_id!r} embeds into space {query.space!r} and {gallery_id!r} into space {gallery.space!r}: "
                f"vectors of different spaces cannot be compared; searching them needs a backfill of the gallery "
                f"with a model of space {query.space!r}")
    if family(manifest, query_id) & family(manifest, gallery_id):
        return ""
    return (f"{query_id!r} and {gallery_id!r} are both in space {query.space!r} but not joined by lineage "
            f"(neither descends from the other and they share no ancestor; their lineages start at "
            f"{sorted(roots(manifest, query_id))} and {sorted(roots(manifest, gallery_id))}); searching them "
            f"needs a backfill of the gallery with {query_id!r}")


def searchable_galleries(manifest: Manifest, query_id: str) -> list[str]:
    """The models whose gallery vectors `query_id` may search, sorted by id."""
    return sorted(m for m in manifest.models if comparable(manifest, query_id, m))
