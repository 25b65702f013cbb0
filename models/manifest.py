"""The release manifest: which models a release holds, their files, spaces, lineage and figures.

A release is a folder with `manifest.json` and the ONNX files it names. `Manifest.from_dict` validates
every field and raises `ManifestError` naming the field that is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic import write_atomic
from models.preprocess import Preprocess

ROLES = ("cloud", "edge")
SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest that does not follow the release contract."""


@dataclass(frozen=True)
class Fingerprint:
    """The photo fingerprint every model of a space appends to its semantic embedding.

    A model-independent descriptor computed from the pixels inside each ONNX graph (identical for every model),
    so near-duplicates match across models. A vector is `concat(sqrt(1-weight) * s, sqrt(weight) * f)`: `s` the
    unit semantic part (first dim - `dims` components), `f` the unit fingerprint (last `dims`). A duplicate
    query re-weights its own vector with `duplicate_weight` (see `models.match`); stored vectors never change.
    """

    dims: int
    weight: float
    duplicate_weight: float
    kind: str = "colour-layout-v1"


@dataclass(frozen=True)
class Space:
    """An embedding space: vectors of one dim, compared by inner product on L2-normalised vectors."""

    id: str
    dim: int
    metric: str = "inner_product"
    fingerprint: Fingerprint | None = None
    """The photo fingerprint in the last `fingerprint.dims` components; None: the vectors are semantic only."""

    def to_dict(self) -> dict[str, Any]:
        """The space's JSON form; `fingerprint` is left out when the space has none (as old releases wrote)."""
        data: dict[str, Any] = {"id": self.id, "dim": self.dim, "metric": self.metric}
        if self.fingerprint is not None:
            data["fingerprint"] = vars(self.fingerprint).copy()
        return data


@dataclass(frozen=True)
class ModelFile:
    """One ONNX file of a model: `batch` is None for a dynamic batch, 1 for devices."""

    file: str
    sha256: str
    batch: int | None = None
    precision: str = "fp32"


@dataclass(frozen=True)
class BackfillScorer:
    """How much an older model's stored vector is worth re-encoding with this model (FastFill's idea, linear).

    `score(v) = weights . v + bias` predicts how far the new model would move photo v's vector; a backfill
    re-encodes the highest scores first, so the photos whose old vectors hurt retrieval most go first.
    """

    weights: tuple[float, ...]
    bias: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackfillScorer:
        """The scorer of its JSON form `{"weights": [...], "bias": b}` (the manifest checks it first)."""
        return cls(tuple(float(w) for w in data["weights"]), float(data["bias"]))

    def to_dict(self) -> dict[str, Any]:
        """Its JSON form, as the manifest stores it."""
        return {"weights": list(self.weights), "bias": self.bias}

    def score(self, vectors: np.ndarray) -> np.ndarray:
        """Scores of old vectors [n, dim] (float32 [n]); higher: re-encode sooner."""
        return np.asarray(vectors, np.float32) @ np.asarray(self.weights, np.float32) + np.float32(self.bias)


@dataclass(frozen=True)
class ModelEntry:
    """A released model: identity, lineage, files, preprocessing and its measured figures."""

    id: str
    role: str
    space: str
    dim: int
    version: int
    parents: tuple[str, ...]
    file: str
    sha256: str
    preprocess: Preprocess
    input: str = "image"
    output: str = "embedding"
    opset: int = 17
    arch: str = ""
    variants: dict[str, ModelFile] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    backfill: dict[str, BackfillScorer] = field(default_factory=dict)
    """Per older gallery model id: the scorer that orders a backfill of its vectors with this model."""

    def files(self) -> dict[str, ModelFile]:
        """Every file of the model by variant name; `server` is the dynamic-batch fp32 file."""
        return {"server": ModelFile(self.file, self.sha256), **self.variants}


@dataclass(frozen=True)
class Manifest:
    """The whole release."""

    spaces: dict[str, Space]
    models: dict[str, ModelEntry]
    release: str = ""

    def model(self, model_id: str) -> ModelEntry:
        try:
            return self.models[model_id]
        except KeyError:
            raise KeyError(f"unknown model {model_id!r}; this release holds {sorted(self.models)}") from None

    def of_role(self, role: str) -> list[ModelEntry]:
        """The models of `role`, oldest first: by version, then id (the one tie-break of the project)."""
        return sorted((e for e in self.models.values() if e.role == role), key=lambda e: (e.version, e.id))

    def newest(self, role: str) -> ModelEntry:
        """The model of `role` with the highest version (KeyError when the release holds none)."""
        return self._ends(role)[-1]

    def oldest(self, role: str) -> ModelEntry:
        """The model of `role` with the lowest version (KeyError when the release holds none)."""
        return self._ends(role)[0]

    def _ends(self, role: str) -> list[ModelEntry]:
        entries = self.of_role(role)
        if not entries:
            raise KeyError(f"the release holds no {role} model; it holds {sorted(self.models)}")
        return entries

    def ancestors(self, model_id: str) -> set[str]:
        """Every ancestor of `model_id` (its parents, their parents, ...), without the model itself."""
        seen: set[str] = set()
        todo = list(self.model(model_id).parents)
        while todo:
            parent = todo.pop()
            if parent not in seen and parent != model_id:
                seen.add(parent)
                todo.extend(self.model(parent).parents)
        return seen

    def cloud_of(self, edge_id: str) -> ModelEntry:
        """The cloud model an edge model pairs with, by lineage: its cloud ancestor of the same version, else its
        newest cloud ancestor in its space (KeyError when it descends from none)."""
        edge = self.model(edge_id)
        clouds = [self.models[m] for m in self.ancestors(edge_id)]
        clouds = [c for c in clouds if c.role == "cloud" and c.space == edge.space]
        same = [c for c in clouds if c.version == edge.version]
        if not (same or clouds):
            raise KeyError(f"{edge_id!r} descends from no cloud model of its space {edge.space!r}")
        return max(same or clouds, key=lambda e: (e.version, e.id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "release": self.release,
            "spaces": [space.to_dict() for space in self.spaces.values()],
            "models": [_entry_to_dict(entry) for entry in self.models.values()],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("manifest: expected a JSON object at the top level")
        spaces = {}
        for i, raw in enumerate(_get(data, "spaces", list, "manifest")):
            where = f"spaces[{i}]"
            dim = _positive(raw, "dim", where)
            space = Space(id=_get(raw, "id", str, where), dim=dim,
                          metric=_get(raw, "metric", str, where, "inner_product"),
                          fingerprint=_fingerprint(raw, where, dim))
            if space.metric != "inner_product":
                raise ManifestError(f"{where}.metric: only 'inner_product' is supported, got {space.metric!r}")
            spaces[space.id] = space
        models: dict[str, ModelEntry] = {}
        for i, raw in enumerate(_get(data, "models", list, "manifest")):
            entry = _entry_from_dict(raw, f"models[{i}]", spaces)
            if entry.id in models:
                raise ManifestError(f"models[{i}].id: duplicate model id {entry.id!r}")
            models[entry.id] = entry
        for entry in models.values():
            for parent in entry.parents:
                if parent not in models:
                    raise ManifestError(f"model {entry.id!r}: parent {parent!r} is not in the release")
                if models[parent].space != entry.space:
                    raise ManifestError(f"model {entry.id!r}: parent {parent!r} is in another space")
            for old in entry.backfill:
                if old not in models or models[old].space != entry.space:
                    raise ManifestError(f"model {entry.id!r}: backfill scorer for {old!r}, not a model of its space "
                                        f"in the release")
        return cls(spaces=spaces, models=models, release=_get(data, "release", str, "manifest", ""))

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate `manifest.json` (a file or the release folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest here") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def _fingerprint(raw: dict[str, Any], where: str, dim: int) -> Fingerprint | None:
    """A space's optional `fingerprint` object, checked: 0 < dims < the space's dim, both weights in (0, 1)."""
    if raw.get("fingerprint") is None:
        return None
    data = _get(raw, "fingerprint", dict, where)
    where = f"{where}.fingerprint"
    dims = _positive(data, "dims", where)
    if dims >= dim:
        raise ManifestError(f"{where}.dims: must be smaller than the space's dim {dim} (the rest is the semantic "
                            f"part), got {dims}")
    return Fingerprint(dims=dims, weight=_fraction(data, "weight", where),
                       duplicate_weight=_fraction(data, "duplicate_weight", where),
                       kind=_get(data, "kind", str, where, "colour-layout-v1"))


def _fraction(data: dict[str, Any], key: str, where: str) -> float:
    value = _get(data, key, object, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ManifestError(f"{where}.{key}: must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _entry_to_dict(entry: ModelEntry) -> dict[str, Any]:
    data = {k: v for k, v in vars(entry).items() if k not in ("preprocess", "variants", "parents", "backfill")}
    data["parents"] = list(entry.parents)
    if entry.backfill:
        data["backfill"] = {m: scorer.to_dict() for m, scorer in entry.backfill.items()}
    data["preprocess"] = entry.preprocess.to_dict()
    data["variants"] = {name: vars(f) for name, f in entry.variants.items()}
    return data


def _entry_from_dict(raw: Any, where: str, spaces: dict[str, Space]) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object")
    model_id = _get(raw, "id", str, where)
    where = f"model {model_id!r}"
    role = _get(raw, "role", str, where)
    if role not in ROLES:
        raise ManifestError(f"{where}.role: must be one of {ROLES}, got {role!r}")
    space = _get(raw, "space", str, where)
    if space not in spaces:
        raise ManifestError(f"{where}.space: unknown space {space!r}; declared: {sorted(spaces)}")
    dim = _positive(raw, "dim", where)
    if dim != spaces[space].dim:
        raise ManifestError(f"{where}.dim: {dim} differs from the dim {spaces[space].dim} of space {space!r}")
    parents = _get(raw, "parents", list, where, [])
    if not all(isinstance(p, str) for p in parents):
        raise ManifestError(f"{where}.parents: must be a list of model ids")
    try:
        preprocess = Preprocess.from_dict(_get(raw, "preprocess", dict, where))
    except ValueError as err:
        raise ManifestError(f"{where}.{err}") from None
    variants = {}
    for name, f in _get(raw, "variants", dict, where, {}).items():
        vwhere = f"{where}.variants.{name}"
        variants[name] = ModelFile(file=_get(f, "file", str, vwhere), sha256=_sha(f, vwhere),
                                   batch=f.get("batch"), precision=_get(f, "precision", str, vwhere, "fp32"))
    return ModelEntry(
        id=model_id, role=role, space=space, dim=dim, version=_positive(raw, "version", where),
        parents=tuple(parents), file=_get(raw, "file", str, where), sha256=_sha(raw, where),
        preprocess=preprocess, input=_get(raw, "input", str, where, "image"),
        output=_get(raw, "output", str, where, "embedding"), opset=_positive(raw, "opset", where, 17),
        arch=_get(raw, "arch", str, where, ""), variants=variants,
        metrics=_get(raw, "metrics", dict, where, {}), card=_get(raw, "card", dict, where, {}),
        backfill=_backfill(raw, where, dim),
    )


def _backfill(raw: dict[str, Any], where: str, dim: int) -> dict[str, BackfillScorer]:
    """An entry's optional `backfill` scorers: per older model id, `dim` finite weights and a finite bias."""
    scorers = {}
    for model_id, data in _get(raw, "backfill", dict, where, {}).items():
        swhere = f"{where}.backfill.{model_id}"
        weights = _get(data, "weights", list, swhere)
        bias = _get(data, "bias", object, swhere)
        numbers = [*weights, bias]
        if len(weights) != dim or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                                          for x in numbers):
            raise ManifestError(f"{swhere}: expected {dim} finite weights and a finite bias")
        scorers[model_id] = BackfillScorer.from_dict(data)
    return scorers


_MISSING = object()


def _get(data: Any, key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    if key not in data:
        if default is _MISSING:
            raise ManifestError(f"{where}: missing the field {key!r}")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _positive(data: Any, key: str, where: str, default: Any = _MISSING) -> int:
    value = _get(data, key, int, where, default)
    if value <= 0:
        raise ManifestError(f"{where}.{key}: must be a positive integer, got {value}")
    return int(value)


def _sha(data: Any, where: str) -> str:
    value = _get(data, "sha256", str, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {value!r}")
    return str(value)
