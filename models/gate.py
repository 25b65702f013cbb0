"""The compatibility gate: may a model enter its space? Judged from the figures recorded in the manifest.

Figures live in `ModelEntry.metrics` as `{"benchmark": name, "matrix": {query: {gallery: {"recall@1",
"recall@5", "map"}}}}`, i.e. M(query, gallery), and optionally further benchmarks in the same form under
`"benchmarks": [{"benchmark": name, "matrix": ...}]` (the open-world part). A figure is read from the
candidate's own matrix first, then from the other models' matrices of the same benchmark.

Every rule is judged on every benchmark the candidate's figures name (the Caltech-101 part and the
open-world part): a model must pass on all of them.

Rules (DESIGN.md):
- an upgrade (replacing an earlier model of its role) must satisfy M(new, g) > M(replaced, g) on Recall@1
  and on mAP for every older cloud gallery g: the cloud models of lower version in the candidate's
  lineage (and the replaced model itself when it is a cloud model);
- an edge model must satisfy M(edge, cloud) >= M(cloud, cloud) - gap Recall@1, for the cloud model
  of its version (its cloud ancestor of the same version, else its newest cloud ancestor); gap = 0.03,
  0.10 on the open-world part (64 px photos of categories no model trained on);
- a model that joins a space already holding older models must descend from one of them.
A model that fails cannot be registered into the space: it could only start a new space, which needs a
backfill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.lineage import family, lineage
from models.manifest import Manifest, ModelEntry

EDGE_GAP = 0.03
"""The largest cross-device gap allowed: M(cloud, cloud) - M(edge, cloud) on Recall@1."""
EDGE_GAPS = {"tinyimagenet_open": 0.10}
"""The benchmarks whose cross-device gap limit differs from EDGE_GAP."""
UPGRADE_METRICS = ("recall@1", "map")
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Check:
    """One comparison of the gate: `measured` against `threshold` (None when a figure is missing)."""

    name: str
    measured: float | None
    threshold: float | None
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer for one candidate, with every check it made and a plain reason."""

    candidate: str
    replaces: str | None
    passed: bool
    checks: list[Check] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "replaces": self.replaces, "passed": self.passed,
                "reason": self.reason, "checks": [vars(c) for c in self.checks]}


def sections(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every benchmark section of a model's figures: the primary one, then those listed under "benchmarks"."""
    extra = metrics.get("benchmarks")
    listed = [s for s in extra if isinstance(s, dict)] if isinstance(extra, list) else []
    return ([metrics] if "matrix" in metrics or "benchmark" in metrics else []) + listed


def benchmarks(candidate: ModelEntry) -> list[str | None]:
    """The benchmarks the candidate's figures name, primary first (one None entry when it has no figures)."""
    names = list(dict.fromkeys(s.get("benchmark") for s in sections(candidate.metrics)))
    return names or [None]


def edge_gap(benchmark: str | None) -> float:
    """The cross-device gap limit of a benchmark."""
    return EDGE_GAPS.get(benchmark or "", EDGE_GAP)


def figure(manifest: Manifest, candidate: ModelEntry, query: str, gallery: str, metric: str,
           benchmark: str | None = None) -> float | None:
    """M(query, gallery)[metric] on `benchmark` (default: the candidate's primary one) from the candidate's
    figures, else another model's of the same benchmark."""
    benchmark = benchmark if benchmark is not None else candidate.metrics.get("benchmark")
    sources = [candidate] + [e for e in manifest.models.values() if e.id != candidate.id]
    for section in (s for entry in sources for s in sections(entry.metrics)):
        if section.get("benchmark") != benchmark:
            continue
        value: Any = section.get("matrix")
        for key in (query, gallery, metric):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def default_replaces(manifest: Manifest, candidate_id: str) -> str | None:
    """The model a candidate upgrades when none is named: its newest ancestor of the same role and space
    with a lower version (None for the first model of its role)."""
    entry = manifest.model(candidate_id)
    older = [manifest.model(m) for m in lineage(manifest, candidate_id)]
    older = [e for e in older if e.role == entry.role and e.space == entry.space and e.version < entry.version]
    return max(older, key=lambda e: e.version).id if older else None


def older_cloud_galleries(manifest: Manifest, candidate_id: str, replaces_id: str) -> list[str]:
    """The older cloud galleries an upgrade must stay compatible with."""
    entry = manifest.model(candidate_id)
    found = {m for m in lineage(manifest, candidate_id)
             if manifest.model(m).role == "cloud" and manifest.model(m).space == entry.space
             and manifest.model(m).version < entry.version}
    if manifest.model(replaces_id).role == "cloud":
        found.add(replaces_id)
    return sorted(found, key=lambda m: (manifest.model(m).version, m))


def _compare(name: str, measured: float | None, threshold: float | None, strict: bool, missing: list[str],
             detail: str) -> Check:
    if measured is None or threshold is None:
        return Check(name, measured, threshold, False, f"missing figure: {', '.join(missing)}")
    passed = measured > threshold + TOLERANCE if strict else measured >= threshold - TOLERANCE
    return Check(name, round(measured, 6), round(threshold, 6), passed, detail)


def _on(benchmark: str | None, primary: bool) -> str:
    """The suffix naming a non-primary benchmark in a check's name."""
    return "" if primary or benchmark is None else f" on {benchmark}"


def upgrade_checks(manifest: Manifest, candidate: ModelEntry, replaces_id: str) -> list[Check]:
    """ECC on every older cloud gallery and every benchmark: M(new, g) > M(replaced, g), on Recall@1 and mAP."""
    galleries = older_cloud_galleries(manifest, candidate.id, replaces_id)
    if not galleries:
        return [Check(f"upgrade of {replaces_id}: older cloud galleries", 0, 1, False,
                      f"{candidate.id!r} descends from no older cloud model, so nothing shows it can search the "
                      f"galleries {replaces_id!r} searched")]
    checks = []
    for i, bench in enumerate(benchmarks(candidate)):
        for gallery in galleries:
            for metric in UPGRADE_METRICS:
                new = figure(manifest, candidate, candidate.id, gallery, metric, bench)
                old = figure(manifest, candidate, replaces_id, gallery, metric, bench)
                missing = [f"M({q}, {gallery}) {metric}{_on(bench, False)}"
                           for q, v in ((candidate.id, new), (replaces_id, old)) if v is None]
                name = f"ECC {metric}: M({candidate.id}, {gallery}) > M({replaces_id}, {gallery}){_on(bench, i == 0)}"
                checks.append(_compare(name, new, old, True, missing, "the upgrade must beat the model it replaces"))
    return checks


def edge_checks(manifest: Manifest, candidate: ModelEntry) -> list[Check]:
    """Cross-device gap on every benchmark: M(edge, cloud) >= M(cloud, cloud) - its gap limit on Recall@1."""
    try:
        cloud = manifest.cloud_of(candidate.id).id
    except KeyError as err:
        name = f"edge gap recall@1: M({candidate.id}, cloud) >= M(cloud, cloud) - {EDGE_GAP}"
        return [Check(name, None, None, False, err.args[0])]
    checks = []
    for i, bench in enumerate(benchmarks(candidate)):
        gap = edge_gap(bench)
        cross = figure(manifest, candidate, candidate.id, cloud, "recall@1", bench)
        own = figure(manifest, candidate, cloud, cloud, "recall@1", bench)
        missing = [f"M({q}, {cloud}) recall@1{_on(bench, False)}" for q, v in ((candidate.id, cross), (cloud, own))
                   if v is None]
        name = f"edge gap recall@1: M({candidate.id}, {cloud}) >= M({cloud}, {cloud}) - {gap}{_on(bench, i == 0)}"
        checks.append(_compare(name, cross, None if own is None else own - gap, False, missing,
                               "the edge model must stay close to its cloud model on that model's gallery"))
    return checks


def lineage_check(manifest: Manifest, candidate: ModelEntry) -> list[Check]:
    """A model joining a space that already holds older models must descend from one of them."""
    older = [e.id for e in manifest.models.values()
             if e.space == candidate.space and e.id != candidate.id and e.version < candidate.version]
    if not older:
        return []
    joined = len(set(older) & family(manifest, candidate.id))
    return [Check(f"lineage: descends from a model of space {candidate.space!r}", joined, 1, joined >= 1,
                  f"older models of the space: {sorted(older)}")]


def check_gate(manifest: Manifest, candidate_id: str, replaces_id: str | None = None) -> GateVerdict:
    """Judge whether `candidate_id` may enter its space, as an upgrade of `replaces_id` when given."""
    if candidate_id not in manifest.models:
        return GateVerdict(candidate_id, replaces_id, False, [],
                           f"unknown model {candidate_id!r}: this release holds {sorted(manifest.models)}")
    candidate = manifest.model(candidate_id)
    checks = lineage_check(manifest, candidate)
    if replaces_id is not None:
        problem = _replacement_problem(manifest, candidate, replaces_id)
        if problem:
            checks.append(Check(f"upgrade of {replaces_id}", None, None, False, problem))
        else:
            checks += upgrade_checks(manifest, candidate, replaces_id)
    if candidate.role == "edge":
        checks += edge_checks(manifest, candidate)
    return GateVerdict(candidate_id, replaces_id, all(c.passed for c in checks), checks,
                       _reason(candidate, checks))


def _replacement_problem(manifest: Manifest, candidate: ModelEntry, replaces_id: str) -> str:
    if replaces_id not in manifest.models:
        return f"the replaced model {replaces_id!r} is not in the release"
    old = manifest.model(replaces_id)
    if old.role != candidate.role:
        return (f"{replaces_id!r} is a {old.role} model and {candidate.id!r} a {candidate.role} model: a model only "
                f"replaces one of its own role")
    if old.space != candidate.space:
        return f"{replaces_id!r} is in space {old.space!r}, not {candidate.space!r}"
    if old.version >= candidate.version:
        return f"{replaces_id!r} has version {old.version}, not lower than {candidate.id!r}'s {candidate.version}"
    return ""


def _reason(candidate: ModelEntry, checks: list[Check]) -> str:
    failed = [c for c in checks if not c.passed]
    if not failed:
        what = f"{len(checks)} checks" if checks else "no older model to stay compatible with"
        return f"{candidate.id!r} passes the compatibility gate of space {candidate.space!r} ({what})"
    lines = "; ".join(_describe(c) for c in failed)
    return (f"{candidate.id!r} fails the compatibility gate of space {candidate.space!r}: {lines}. It cannot be "
            f"registered into space {candidate.space!r}; it could only start a new space, which needs a backfill "
            f"(re-encoding every gallery photo with it)")


def _describe(check: Check) -> str:
    if check.measured is None or check.threshold is None:
        return f"{check.name}: {check.detail}"
    return f"{check.name}: measured {check.measured:.4f}, needs {check.threshold:.4f} ({check.detail})"
