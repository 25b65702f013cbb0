"""The figures of the benchmark report, computed from embeddings through `models.benchmark.metrics`: the
compatibility matrix, ECC verdicts and AC, cross-device gaps, compatibility tax, NFR/PFR and the mixed-gallery
curve. `build_report` returns them as a JSON-ready dict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.benchmark.metrics import (
    DISTRACTOR,
    RetrievalResult,
    ecc,
    evaluate_retrieval,
    flip_rates,
    mixed_take,
)
from training.evaluate.protocol import (
    MAIN,
    REACH_TOLERANCE,
    UPGRADE_METRICS,
    BackfillSpec,
    DevicePair,
    FlipPair,
    Labels,
    MixedSpec,
    ModelEmbeddings,
    Protocol,
    TaxPair,
    UpgradePair,
)


class Evaluator:
    """Runs each (query model, gallery) search once and keeps its RetrievalResult."""

    def __init__(self, models: Sequence[ModelEmbeddings], labels: Labels) -> None:
        self.models = {m.id: m for m in models}
        if len(self.models) != len(models):
            raise ValueError(f"duplicate model ids in {[m.id for m in models]}")
        self.labels = labels
        self._results: dict[tuple[Any, ...], RetrievalResult] = {}
        for m in models:
            self._check_sizes(m)

    def _check_sizes(self, m: ModelEmbeddings) -> None:
        if len(m.queries) != len(self.labels.queries):
            raise ValueError(f"model {m.id!r} has {len(m.queries)} query vectors for {len(self.labels.queries)} labels")
        if m.gallery is not None and len(m.gallery) != len(self.labels.gallery):
            raise ValueError(f"model {m.id!r} has {len(m.gallery)} gallery vectors for "
                             f"{len(self.labels.gallery)} labels")

    def model(self, model_id: str) -> ModelEmbeddings:
        """The model named `model_id`, or a ValueError listing the known ones."""
        if model_id not in self.models:
            raise ValueError(f"unknown model {model_id!r}: the report has {sorted(self.models)}")
        return self.models[model_id]

    def gallery(self, model_id: str) -> np.ndarray:
        """The gallery embeddings of a cloud model."""
        m = self.model(model_id)
        if m.gallery is None:
            raise ValueError(f"model {model_id!r} is an {m.role} model: it has no gallery to search")
        return m.gallery

    def search(self, query: str, gallery: str) -> RetrievalResult:
        """M(query, gallery): queries encoded by `query`, the whole gallery by `gallery`."""
        return self._run(query, (gallery,), lambda: self.gallery(gallery))

    def search_mixed(self, query: str, spec: MixedSpec, share: float) -> RetrievalResult:
        """`query` searching one gallery of which a share `share` is encoded by the new cloud model (the rest by
        the old one, or by the old and the oldest one)."""
        key = (*spec.generations, spec.oldest_share, share, spec.seed)
        return self._run(query, key, lambda: self.mixed_vectors(spec, share))

    def mixed_vectors(self, spec: MixedSpec, share: float) -> np.ndarray:
        """The mixed gallery of `spec` at `share`."""
        return spec.mix({m: self.gallery(m) for m in spec.generations}, share)

    def search_backfilled(self, query: str, spec: BackfillSpec, share: float, seed: int | None) -> RetrievalResult:
        """`query` searching the gallery after the first `share` of its photos were re-encoded, in the
        priority order (`seed` None) or the random one drawn with `seed`."""
        def build() -> np.ndarray:
            vectors = self.mixed_vectors(spec.start, 0.0)
            order = np.argsort(-spec.priority, kind="stable") if seed is None else mixed_take(len(vectors), 1.0, seed)
            done = order[: round(share * len(vectors))]
            vectors[done] = self.gallery(spec.start.new_gallery)[done]
            return vectors

        return self._run(query, ("backfill", *spec.start.generations, share, seed), build)

    def _run(self, query: str, gallery_key: tuple[Any, ...], build: Callable[[], np.ndarray]) -> RetrievalResult:
        key = (query, *gallery_key)
        if key not in self._results:
            queries, vectors = semantic_common(self.model(query).queries, build())
            self._results[key] = evaluate_retrieval(queries, vectors, self.labels.queries, self.labels.gallery,
                                                    self.labels.old_queries, self.labels.exclude_self)
        return self._results[key]


def semantic_common(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of two spaces of different widths (a baseline in its own space, without the photo fingerprint
    that the main space appends) are compared on their leading, semantic dims; equal widths pass unchanged."""
    width = min(queries.shape[1], gallery.shape[1])
    return queries[:, :width], gallery[:, :width]


def matrix_pairs(models: Sequence[ModelEmbeddings], protocol: Protocol) -> list[tuple[str, str]]:
    """Every (query model, cloud gallery model) the matrix shows: the default pairs plus those the protocol
    names, in model order."""
    wanted = {(q.id, g.id) for q in models for g in models
              if g.role == "cloud" and q.dim == g.dim and (q.group == g.group or MAIN in (q.group, g.group))}
    wanted |= set(protocol.matrix)
    wanted |= {(u.new, g) for u in protocol.upgrades for g in u.galleries}
    wanted |= {(u.replaced, g) for u in protocol.upgrades for g in u.galleries}
    wanted |= {p for d in protocol.cross_device for p in ((d.edge, d.cloud), (d.cloud, d.cloud))}
    if protocol.tax:
        wanted |= {(protocol.tax.independent,) * 2, (protocol.tax.compatible,) * 2}
    wanted |= {p for f in protocol.flips for p in ((f.a, f.gallery), (f.b, f.gallery))}
    order = {m.id: i for i, m in enumerate(models)}
    unknown = sorted({m for pair in wanted for m in pair} - set(order))
    if unknown:
        raise ValueError(f"the protocol names unknown models {unknown}: the report has {sorted(order)}")
    return sorted(wanted, key=lambda p: (order[p[0]], order[p[1]]))


def _case(models: dict[str, ModelEmbeddings], query: str, gallery: str) -> str:
    """ml-fct style case label of a pair, e.g. "new/old" (lowest version old, highest new, others vN)."""
    versions = [m.version for m in models.values()]
    low, high = min(versions), max(versions)

    def word(v: int) -> str:
        return "old" if v == low < high else "new" if v == high > low else f"v{v}"

    return f"{word(models[query].version)}/{word(models[gallery].version)}"


def _matrix(ev: Evaluator, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The compatibility matrix M(q, g), one entry per pair, baselines tagged by group."""
    rows = []
    for q, g in pairs:
        mq, mg = ev.model(q), ev.model(g)
        rows.append({"query": q, "gallery": g, "query_group": mq.group, "gallery_group": mg.group,
                     "baseline": mq.baseline or mg.baseline, "case": _case(ev.models, q, g),
                     **ev.search(q, g).to_dict()})
    return rows


def _figure(result: RetrievalResult, metric: str) -> float:
    """The overall figure `metric` ("recall@1", "recall@5" or "map") of a result."""
    value = result.to_dict()["overall"][metric]
    return float("nan") if value is None else float(value)


def _ecc(ev: Evaluator, upgrades: tuple[UpgradePair, ...]) -> list[dict[str, Any]]:
    """ECC of every upgrade on every listed gallery: M(new, g) > M(replaced, g) on Recall@1 and mAP."""
    rows = []
    for u in upgrades:
        for g in u.galleries:
            new, old = ev.search(u.new, g), ev.search(u.replaced, g)
            checks = {m: {"new": _figure(new, m), "replaced": _figure(old, m),
                          "pass": ecc(_figure(new, m), _figure(old, m))} for m in UPGRADE_METRICS}
            rows.append({"new": u.new, "replaced": u.replaced, "gallery": g, "group": ev.model(u.new).group,
                         **checks, "pass": all(c["pass"] for c in checks.values())})
    return rows


def _upgrades(ev: Evaluator, upgrades: tuple[UpgradePair, ...], ecc_rows: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """One verdict per upgrade pair: it passes when it passes ECC on every listed gallery."""
    return [{"new": u.new, "replaced": u.replaced, "group": ev.model(u.new).group, "galleries": list(u.galleries),
             "pass": bool(u.galleries) and all(r["pass"] for r in ecc_rows
                                               if (r["new"], r["replaced"]) == (u.new, u.replaced))}
            for u in upgrades]


def _ac(upgrade_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """AC: share of the main chain's upgrade pairs that pass ECC (baselines excluded)."""
    main = [r for r in upgrade_rows if r["group"] == MAIN]
    passed = sum(r["pass"] for r in main)
    return {"group": MAIN, "passed": passed, "pairs": len(main), "value": passed / len(main) if main else None}


def _cross_device(ev: Evaluator, pairs: tuple[DevicePair, ...], threshold: float) -> list[dict[str, Any]]:
    """Cross-device gap M(cloud, cloud) - M(edge, cloud) on Recall@1, passing at or below `threshold`."""
    rows = []
    for p in pairs:
        own, cross = _figure(ev.search(p.cloud, p.cloud), "recall@1"), _figure(ev.search(p.edge, p.cloud), "recall@1")
        rows.append({"edge": p.edge, "cloud": p.cloud, "cloud_recall@1": own, "edge_recall@1": cross,
                     "gap": own - cross, "threshold": threshold, "pass": bool(own - cross <= threshold)})
    return rows


def _tax(ev: Evaluator, tax: TaxPair | None) -> dict[str, Any] | None:
    """Compatibility tax M(independent, independent) - M(compatible, compatible), on Recall@1 and mAP."""
    if tax is None:
        return None
    ind, com = ev.search(tax.independent, tax.independent), ev.search(tax.compatible, tax.compatible)
    figures = {m: {"independent": _figure(ind, m), "compatible": _figure(com, m),
                   "tax": _figure(ind, m) - _figure(com, m)} for m in UPGRADE_METRICS}
    return {"independent": tax.independent, "compatible": tax.compatible, **figures}


def _flips(ev: Evaluator, pairs: tuple[FlipPair, ...]) -> list[dict[str, Any]]:
    """NFR/PFR of each listed (a -> b on gallery) move, overall and per old/new-class queries."""
    rows = []
    old = ev.labels.old_queries.astype(bool)
    for f in pairs:
        a, b = ev.search(f.a, f.gallery).hits_at_1, ev.search(f.b, f.gallery).hits_at_1
        subsets = {name: dict(zip(("nfr", "pfr"), flip_rates(a[mask], b[mask]), strict=True))
                   for name, mask in (("overall", np.ones_like(old)), ("old", old), ("new", ~old))}
        rows.append({"a": f.a, "b": f.b, "gallery": f.gallery, "recall@1_a": float(a.mean()),
                     "recall@1_b": float(b.mean()), **subsets})
    return rows


def _mixed(ev: Evaluator, spec: MixedSpec | None) -> dict[str, Any] | None:
    """The mixed-gallery curve of each query model and its largest dip below the all-old end."""
    if spec is None:
        return None
    curves = []
    for q in spec.query_models:
        points = [ev.search_mixed(q, spec, p) for p in spec.shares]
        values = {m: [_figure(r, m) for r in points] for m in UPGRADE_METRICS}
        start = spec.shares.index(0.0)
        dips = {m: max(0.0, v[start] - float(np.nanmin(v))) for m, v in values.items()}
        curves.append({"query": q, **values, "max_dip": dips, "points": [r.to_dict() for r in points]})
    return {"old_gallery": spec.old_gallery, "new_gallery": spec.new_gallery, "seed": spec.seed,
            "oldest": spec.oldest, "oldest_share": spec.oldest_share, "shares": list(spec.shares), "curves": curves}


def _backfill(ev: Evaluator, spec: BackfillSpec | None) -> dict[str, Any] | None:
    """Recall@1 against the share backfilled, in the scorer's order and a random one, per query model, and the
    first share at which each order comes within REACH_TOLERANCE of the fully backfilled Recall@1."""
    if spec is None:
        return None
    def curve(q: str, seed: int | None) -> list[float]:
        return [_figure(ev.search_backfilled(q, spec, s, seed), "recall@1") for s in spec.shares]

    def reach(values: list[float]) -> float:
        return next(s for s, v in zip(spec.shares, values, strict=True) if v >= values[-1] - REACH_TOLERANCE)

    curves = []
    for q in spec.query_models:
        ordered = curve(q, None)
        draws = [curve(q, seed) for seed in spec.random_seeds]
        median = np.median(np.array(draws, dtype=np.float64), axis=0).tolist()
        curves.append({"query": q, "ordered": {"recall@1": ordered, "reaches_full_at": reach(ordered)},
                       "random": {"recall@1": median, "reaches_full_at": reach(median),
                                  "each_reaches_full_at": [reach(d) for d in draws]}})
    return {"start": spec.start.generations[:-1], "oldest_share": spec.start.oldest_share,
            "new_gallery": spec.start.new_gallery, "shares": list(spec.shares), "tolerance": REACH_TOLERANCE,
            "random_seeds": list(spec.random_seeds), "curves": curves}


def _clean(value: Any) -> Any:
    """`value` with every NaN float replaced by None, so the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    return value


def build_report(models: Sequence[ModelEmbeddings], labels: Labels, protocol: Protocol,
                 name: str = "caltech101") -> dict[str, Any]:
    """Measure every figure of the benchmark protocol; returns a JSON-serialisable dict."""
    ev = Evaluator(models, labels)
    pairs = matrix_pairs(models, protocol)
    ecc_rows = _ecc(ev, protocol.upgrades)
    upgrades = _upgrades(ev, protocol.upgrades, ecc_rows)
    old = labels.old_queries.astype(bool)
    report = {
        "benchmark": name,
        "data": {"queries": len(labels.queries), "old_queries": int(old.sum()), "new_queries": int((~old).sum()),
                 "gallery": len(labels.gallery), "distractors": int((labels.gallery == DISTRACTOR).sum()),
                 "leave_one_out": labels.exclude_self},
        "models": [{"id": m.id, "role": m.role, "version": m.version, "group": m.group, "dim": m.dim}
                   for m in models],
        "matrix": _matrix(ev, pairs),
        "ecc": ecc_rows,
        "upgrades": upgrades,
        "ac": _ac(upgrades),
        "cross_device": _cross_device(ev, protocol.cross_device, protocol.gap_threshold),
        "tax": _tax(ev, protocol.tax),
        "flips": _flips(ev, protocol.flips),
        "mixed": _mixed(ev, protocol.mixed),
        "mixed_chain": _mixed(ev, protocol.chain_mixed),
        "backfill": _backfill(ev, protocol.backfill),
    }
    return dict(_clean(report))


def manifest_metrics(report: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """The report's matrix in the manifest's `metrics` form that the compatibility gate reads:
    {"benchmark": name, "matrix": {query: {gallery: {"recall@1", "recall@5", "map"}}}} (overall figures), with
    the matrices of `more` reports (the open-world part) under "benchmarks" in the same form."""
    matrix: dict[str, dict[str, Any]] = {}
    for row in report["matrix"]:
        figures = {k: v for k, v in row["overall"].items() if k != "queries"}
        matrix.setdefault(row["query"], {})[row["gallery"]] = figures
    metrics: dict[str, Any] = {"benchmark": report["benchmark"], "matrix": matrix}
    if more:
        metrics["benchmarks"] = [manifest_metrics(r) for r in more]
    return metrics
