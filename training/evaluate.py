"""The benchmark report: compatibility matrix, ECC verdicts and AC, cross-device gaps, compatibility tax,
NFR/PFR and the mixed-gallery curve, measured from embeddings the training orchestration produced.

Torch-free (numpy, faiss, matplotlib) so the server's benchmark tools reuse it. Inputs are plain
dataclasses: `ModelEmbeddings` per model, `Labels` of the benchmark, and a `Protocol` naming which
pairs to judge. `build_report` returns a JSON-ready dict; `write_report` writes it as JSON, Markdown and
two PNG figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.metrics import DISTRACTOR, RetrievalResult, ecc, evaluate_retrieval, flip_rates, mixed_gallery

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
    """Class labels of the queries [Nq] and gallery [Ng] (-1 = distractor), and the old-class query mask."""

    queries: np.ndarray
    gallery: np.ndarray
    old_queries: np.ndarray

    def __post_init__(self) -> None:
        if self.old_queries.shape != self.queries.shape:
            raise ValueError(f"old-class mask {self.old_queries.shape} and query labels {self.queries.shape} differ")


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
    searched by each of `query_models`; the photos taken come from one permutation drawn with `seed`."""

    old_gallery: str
    new_gallery: str
    query_models: tuple[str, ...]
    shares: tuple[float, ...] = SHARES
    seed: int = 0

    def __post_init__(self) -> None:
        if 0.0 not in self.shares or any(not 0.0 <= p <= 1.0 for p in self.shares):
            raise ValueError(f"mixed-gallery shares must lie in [0, 1] and include 0 (the all-old end), "
                             f"got {self.shares}")


@dataclass(frozen=True)
class Protocol:
    """What the report judges. `matrix` lists extra (query, gallery) pairs to measure beyond the default:
    every query model on every cloud gallery of the same dim whose group is its own or "main"."""

    upgrades: tuple[UpgradePair, ...] = ()
    cross_device: tuple[DevicePair, ...] = ()
    tax: TaxPair | None = None
    flips: tuple[FlipPair, ...] = ()
    mixed: MixedSpec | None = None
    gap_threshold: float = GAP_THRESHOLD
    matrix: tuple[tuple[str, str], ...] = ()


class Evaluator:
    """Runs each (query model, gallery) search once and keeps its RetrievalResult."""

    def __init__(self, models: Sequence[ModelEmbeddings], labels: Labels) -> None:
        self.models = {m.id: m for m in models}
        if len(self.models) != len(models):
            raise ValueError(f"duplicate model ids in {[m.id for m in models]}")
        self.labels = labels
        self._results: dict[tuple[str, str, str, float, int], RetrievalResult] = {}
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
        return self._run(query, gallery, gallery, 1.0, 0)

    def search_mixed(self, query: str, spec: MixedSpec, share: float) -> RetrievalResult:
        """`query` searching one gallery of which a share `share` is encoded by the new cloud model."""
        return self._run(query, spec.old_gallery, spec.new_gallery, share, spec.seed)

    def _run(self, query: str, old: str, new: str, share: float, seed: int) -> RetrievalResult:
        key = (query, old, new, share, seed)
        if key not in self._results:
            vectors = self.gallery(new) if old == new else mixed_gallery(self.gallery(old), self.gallery(new),
                                                                         share, seed)
            queries, vectors = semantic_common(self.model(query).queries, vectors)
            self._results[key] = evaluate_retrieval(queries, vectors, self.labels.queries,
                                                    self.labels.gallery, self.labels.old_queries)
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
            "shares": list(spec.shares), "curves": curves}


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
                 "gallery": len(labels.gallery), "distractors": int((labels.gallery == DISTRACTOR).sum())},
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
    }
    return dict(_clean(report))


def manifest_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The report's matrix in the manifest's `metrics` form that the compatibility gate reads:
    {"benchmark": name, "matrix": {query: {gallery: {"recall@1", "recall@5", "map"}}}} (overall figures)."""
    matrix: dict[str, dict[str, Any]] = {}
    for row in report["matrix"]:
        figures = {k: v for k, v in row["overall"].items() if k != "queries"}
        matrix.setdefault(row["query"], {})[row["gallery"]] = figures
    return {"benchmark": report["benchmark"], "matrix": matrix}


def _num(value: Any, digits: int = 3) -> str:
    """A figure for a table: fixed decimals, "–" when missing."""
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _tagged(report: dict[str, Any], model_id: str) -> str:
    """A model id, with its baseline group in brackets when it is a baseline."""
    group = next((m["group"] for m in report["models"] if m["id"] == model_id), MAIN)
    return model_id if group == MAIN else f"{model_id} [{group}]"


def _pass(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def markdown_table(report: dict[str, Any]) -> str:
    """The compatibility matrix as a Markdown table, one row per (query, gallery) pair (ml-fct style cases)."""
    header = ("Case", "Query", "Gallery", "R@1", "R@5", "mAP", "R@1 old", "R@1 new", "mAP old", "mAP new")
    rows = [(r["case"], _tagged(report, r["query"]), _tagged(report, r["gallery"]), _num(r["overall"]["recall@1"]),
             _num(r["overall"]["recall@5"]), _num(r["overall"]["map"]), _num(r["old"]["recall@1"]),
             _num(r["new"]["recall@1"]), _num(r["old"]["map"]), _num(r["new"]["map"])) for r in report["matrix"]]
    return _table(header, rows)


def _ecc_markdown(report: dict[str, Any]) -> str:
    """ECC verdicts and AC."""
    rows = [(_tagged(report, r["new"]), r["replaced"], r["gallery"], _num(r["recall@1"]["new"]),
             _num(r["recall@1"]["replaced"]), _num(r["map"]["new"]), _num(r["map"]["replaced"]), _pass(r["pass"]))
            for r in report["ecc"]]
    ac = report["ac"]
    return (_table(("New", "Replaced", "Gallery", "R@1 new", "R@1 replaced", "mAP new", "mAP replaced", "ECC"), rows)
            + f"\n\nAC (main chain): {ac['passed']}/{ac['pairs']} upgrade pairs pass = {_num(ac['value'], 2)}"
            " (baselines excluded)")


def _gap_and_tax_markdown(report: dict[str, Any]) -> str:
    """Cross-device gaps and the compatibility tax."""
    gaps = _table(("Edge", "Cloud", "R@1 cloud/cloud", "R@1 edge/cloud", "Gap", "Verdict"),
                  [(r["edge"], r["cloud"], _num(r["cloud_recall@1"]), _num(r["edge_recall@1"]), _num(r["gap"]),
                    f"{_pass(r['pass'])} (≤ {r['threshold']})") for r in report["cross_device"]])
    tax = report["tax"]
    if tax is None:
        return gaps
    rows = [(m, _num(tax[m]["independent"]), _num(tax[m]["compatible"]), _num(tax[m]["tax"]))
            for m in UPGRADE_METRICS]
    return gaps + "\n\n## Compatibility tax\n\n" + _table(
        ("Metric", f"{tax['independent']} (independent)", f"{tax['compatible']} (compatible)", "Tax"), rows)


def _flips_markdown(report: dict[str, Any]) -> str:
    """NFR/PFR table."""
    rows = [(r["a"], r["b"], r["gallery"], _num(r["recall@1_a"]), _num(r["recall@1_b"]), _num(r["overall"]["nfr"]),
             _num(r["overall"]["pfr"]), _num(r["old"]["nfr"]), _num(r["new"]["nfr"])) for r in report["flips"]]
    return _table(("a", "b", "Gallery", "R@1 a", "R@1 b", "NFR", "PFR", "NFR old", "NFR new"), rows)


def _mixed_markdown(report: dict[str, Any]) -> str:
    """Mixed-gallery Recall@1 per share, per query model, with the largest dip below the all-old end."""
    mixed = report["mixed"]
    if mixed is None:
        return "No mixed-gallery protocol."
    header = ["Query", *(f"p={p:g}" for p in mixed["shares"]), "max dip R@1", "max dip mAP"]
    rows = [(c["query"], *(_num(v) for v in c["recall@1"]), _num(c["max_dip"]["recall@1"]),
             _num(c["max_dip"]["map"])) for c in mixed["curves"]]
    return (f"Gallery: a share p encoded by {mixed['new_gallery']}, the rest by {mixed['old_gallery']}, "
            f"in one index (seed {mixed['seed']}); Recall@1.\n\n" + _table(header, rows))


def markdown_report(report: dict[str, Any], name: str | None = None) -> str:
    """The whole report as Markdown: matrix, ECC/AC, gaps, tax, flip rates, mixed gallery and the figures."""
    name = name or report["benchmark"]
    d = report["data"]
    return "\n\n".join([
        f"# Benchmark report: {report['benchmark']}",
        f"{d['queries']} queries ({d['old_queries']} old-class, {d['new_queries']} new-class); gallery of "
        f"{d['gallery']} photos ({d['distractors']} distractors). Case = query/gallery model generation.",
        "## Compatibility matrix", markdown_table(report), f"![Recall@1 matrix]({name}_matrix.png)",
        "## Upgrades (ECC on Recall@1 and mAP)", _ecc_markdown(report),
        "## Cross-device gap", _gap_and_tax_markdown(report),
        "## Flip rates (Recall@1)", _flips_markdown(report),
        "## Mixed gallery", _mixed_markdown(report), f"![Mixed gallery]({name}_mixed.png)",
    ]) + "\n"


def plot_matrix(report: dict[str, Any], path: Path) -> None:
    """Heatmap of the Recall@1 matrix (rows = query model, columns = gallery model), values annotated."""
    from matplotlib.figure import Figure

    queries = list(dict.fromkeys(r["query"] for r in report["matrix"]))
    galleries = list(dict.fromkeys(r["gallery"] for r in report["matrix"]))
    values = np.full((len(queries), len(galleries)), np.nan)
    for r in report["matrix"]:
        recall = r["overall"]["recall@1"]
        values[queries.index(r["query"]), galleries.index(r["gallery"])] = np.nan if recall is None else recall
    fig = Figure(figsize=(1.6 * len(galleries) + 3, 0.6 * len(queries) + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(galleries)), [_tagged(report, g) for g in galleries], rotation=30, ha="right")
    ax.set_yticks(range(len(queries)), [_tagged(report, q) for q in queries])
    ax.set(xlabel="gallery model", ylabel="query model", title=f"Recall@1, {report['benchmark']}")
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def plot_mixed(report: dict[str, Any], path: Path) -> None:
    """Recall@1 against the share of the gallery encoded by the new cloud model, one line per query model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    mixed = report["mixed"]
    for curve in mixed["curves"] if mixed else []:
        recall = [np.nan if v is None else v for v in curve["recall@1"]]
        ax.plot(mixed["shares"], recall, marker="o", label=_tagged(report, curve["query"]))
    new = mixed["new_gallery"] if mixed else "new model"
    ax.set(xlabel=f"share of the gallery encoded by {new}", ylabel="Recall@1",
           title=f"Mixed gallery, {report['benchmark']}")
    ax.grid(alpha=0.3)
    if mixed and mixed["curves"]:
        ax.legend()
    fig.savefig(path, dpi=120)


def write_report(report: dict[str, Any], out_dir: str | Path, name: str = "caltech101") -> dict[str, Path]:
    """Write <name>.json, <name>.md, <name>_matrix.png and <name>_mixed.png into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md",
             "matrix": out / f"{name}_matrix.png", "mixed": out / f"{name}_mixed.png"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(report, name))
    plot_matrix(report, paths["matrix"])
    plot_mixed(report, paths["mixed"])
    return paths
