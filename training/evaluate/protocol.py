"""The benchmark protocol as data: each model's embeddings, the labels, and which pairs the report judges
(upgrades, cross-device pairs, the tax, flips, the mixed gallery). Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.benchmark.metrics import mixed_gallery

MAIN = "main"
"""Group of the models of the product chain; any other group names a baseline (e.g. "independent")."""
ROLES = ("cloud", "edge")
GAP_THRESHOLD = 0.03
"""Largest cross-device gap M(cloud, cloud) - M(edge, cloud) on Recall@1 that passes."""
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Default shares of the mixed gallery encoded by the new cloud model."""
UPGRADE_METRICS = ("recall@1", "map")
"""ECC is judged on both; an upgrade passes on a gallery when it passes both."""


@dataclass(frozen=True, eq=False)
class ModelEmbeddings:
    """One model's benchmark embeddings (L2-normalised float32): queries [Nq, d] for every model, the
    gallery [Ng, d] for cloud models only (edge models never index). `group` is "main" for the product
    chain, else the baseline's name."""

    id: str
    role: str
    version: int
    queries: np.ndarray
    gallery: np.ndarray | None = None
    group: str = MAIN

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"model {self.id!r}: role must be one of {ROLES}, got {self.role!r}")
        if (self.role == "cloud") != (self.gallery is not None):
            need = "needs gallery embeddings" if self.role == "cloud" else "must not have gallery embeddings"
            raise ValueError(f"model {self.id!r}: a {self.role} model {need}")
        if self.queries.ndim != 2 or (self.gallery is not None and self.gallery.shape[1:] != self.queries.shape[1:]):
            raise ValueError(f"model {self.id!r}: queries {self.queries.shape} and gallery "
                             f"{None if self.gallery is None else self.gallery.shape} must be [N, d] of one d")

    @property
    def dim(self) -> int:
        return int(self.queries.shape[1])

    @property
    def baseline(self) -> bool:
        return self.group != MAIN


@dataclass(frozen=True, eq=False)
class Labels:
    """Class labels of the queries [Nq] and gallery [Ng] (-1 = distractor), and the old-class query mask.
    `exclude_self`: query i and gallery photo i are one photo (the open-world protocol: every photo queries all
    the others), left out of its own ranking."""

    queries: np.ndarray
    gallery: np.ndarray
    old_queries: np.ndarray
    exclude_self: bool = False

    def __post_init__(self) -> None:
        if self.old_queries.shape != self.queries.shape:
            raise ValueError(f"old-class mask {self.old_queries.shape} and query labels {self.queries.shape} differ")
        if self.exclude_self and self.queries.shape != self.gallery.shape:
            raise ValueError(f"leave-one-out needs the queries to be the gallery photos: {self.queries.shape} "
                             f"query labels, {self.gallery.shape} gallery labels")


@dataclass(frozen=True)
class UpgradePair:
    """An upgrade: `new` replaces `replaced` (same role) and is judged on each of the older cloud `galleries`."""

    new: str
    replaced: str
    galleries: tuple[str, ...]


@dataclass(frozen=True)
class DevicePair:
    """An edge model and the cloud model of its version, whose gallery it searches."""

    edge: str
    cloud: str


@dataclass(frozen=True)
class TaxPair:
    """The independently trained new model and the compatible new model it is compared with."""

    independent: str
    compatible: str


@dataclass(frozen=True)
class FlipPair:
    """NFR/PFR of moving queries from model `a` to model `b`, both searching `gallery`."""

    a: str
    b: str
    gallery: str


@dataclass(frozen=True)
class MixedSpec:
    """Mixed gallery: a share p of the photos encoded by `new_gallery`, the rest by `old_gallery`, in one index,
    searched by each of `query_models`; the photos taken come from one permutation drawn with `seed`.
    With `oldest`, the rest is itself mixed: a share `oldest_share` of it encoded by `oldest` (another seeded
    permutation), so the gallery holds three generations, as a library does after two upgrades."""

    old_gallery: str
    new_gallery: str
    query_models: tuple[str, ...]
    shares: tuple[float, ...] = SHARES
    seed: int = 0
    oldest: str = ""
    oldest_share: float = 0.0

    def __post_init__(self) -> None:
        if 0.0 not in self.shares or any(not 0.0 <= p <= 1.0 for p in self.shares):
            raise ValueError(f"mixed-gallery shares must lie in [0, 1] and include 0 (the all-old end), "
                             f"got {self.shares}")
        if not 0.0 <= self.oldest_share <= 1.0 or (self.oldest_share > 0) != bool(self.oldest):
            raise ValueError(f"a three-generation gallery names its oldest model and a share in (0, 1], got "
                             f"{self.oldest!r} and {self.oldest_share}")

    @property
    def generations(self) -> list[str]:
        """The gallery models the mix holds, oldest first."""
        return [m for m in (self.oldest, self.old_gallery, self.new_gallery) if m]

    def old_mix(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """The gallery before the new model took any photo: `rows[m]` holds model m's rows (vectors, or any
        per-photo values) of the same photos, in one order; with `oldest`, its share is drawn with seed + 1."""
        old = rows[self.old_gallery]
        return mixed_gallery(old, rows[self.oldest], self.oldest_share, self.seed + 1) if self.oldest else old

    def mix(self, rows: Mapping[str, np.ndarray], share: float) -> np.ndarray:
        """The gallery at `share`: the new model's rows for the photos it took (drawn with `seed`), else
        `old_mix`'s."""
        return mixed_gallery(self.old_mix(rows), rows[self.new_gallery], share, self.seed)


BACKFILL_SHARES = tuple(i / 10 for i in range(11))
REACH_TOLERANCE = 0.002
"""A backfill 'reaches' the fully backfilled Recall@1 at the first share within this of it."""


@dataclass(frozen=True, eq=False)
class BackfillSpec:
    """Backfilling a gallery to `start.new_gallery`: it starts as `start` at share 0 (the older models' vectors);
    a share s of its photos is re-encoded, in the order of `priority` (one score per gallery photo, highest
    first: the shipped scorer's) and in random orders, one per seed of `random_seeds` (the baseline is their
    pointwise median: one random draw alone moved 'reaches full at' by tens of points), searched by each of
    `query_models`."""

    start: MixedSpec
    priority: np.ndarray
    query_models: tuple[str, ...]
    shares: tuple[float, ...] = BACKFILL_SHARES
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    @property
    def generations(self) -> list[str]:
        """The gallery models the backfill starts from and ends on, oldest first."""
        return self.start.generations


@dataclass(frozen=True)
class Protocol:
    """What the report judges. `matrix` lists extra (query, gallery) pairs to measure beyond the default:
    every query model on every cloud gallery of the same dim whose group is its own or "main"."""

    upgrades: tuple[UpgradePair, ...] = ()
    cross_device: tuple[DevicePair, ...] = ()
    tax: TaxPair | None = None
    flips: tuple[FlipPair, ...] = ()
    mixed: MixedSpec | None = None
    chain_mixed: MixedSpec | None = None
    """The three-generation gallery (reported as `mixed_chain`)."""
    backfill: BackfillSpec | None = None
    gap_threshold: float = GAP_THRESHOLD
    matrix: tuple[tuple[str, str], ...] = ()
