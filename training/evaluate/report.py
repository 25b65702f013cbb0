"""The benchmark report written out: Markdown tables, the Recall@1 heatmap and the mixed-gallery plot, and the
JSON beside them (through `models.benchmark.report`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark.report import table, write
from training.evaluate.protocol import MAIN, UPGRADE_METRICS


def _num(value: Any, digits: int = 3) -> str:
    """A figure for a table: fixed decimals, "–" when missing."""
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (without the final newline: the report joins its sections itself)."""
    return table(list(header), [list(r) for r in rows]).rstrip("\n")


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


def _mixed_markdown(mixed: dict[str, Any] | None) -> str:
    """Mixed-gallery Recall@1 per share, per query model, with the largest dip below the all-old end."""
    if mixed is None:
        return "No mixed-gallery protocol."
    header = ["Query", *(f"p={p:g}" for p in mixed["shares"]), "max dip R@1", "max dip mAP"]
    rows = [(c["query"], *(_num(v) for v in c["recall@1"]), _num(c["max_dip"]["recall@1"]),
             _num(c["max_dip"]["map"])) for c in mixed["curves"]]
    rest = mixed["old_gallery"]
    if mixed.get("oldest"):
        rest = (f"{mixed['oldest_share']:.0%} of it by {mixed['oldest']} and {1 - mixed['oldest_share']:.0%} by "
                f"{mixed['old_gallery']} (three generations in one index)")
    return (f"Gallery: a share p encoded by {mixed['new_gallery']}, the rest {rest}, "
            f"in one index (seed {mixed['seed']}); Recall@1.\n\n" + _table(header, rows))


def _backfill_markdown(backfill: dict[str, Any]) -> str:
    """Recall@1 per share backfilled, the scorer's order beside a random one, and where each reaches the end."""
    header = ["Query", "Order", *(f"{p:.0%}" for p in backfill["shares"]), "reaches full at"]
    rows = [(c["query"], name, *(_num(v) for v in c[name]["recall@1"]), _reached(c[name]))
            for c in backfill["curves"] for name in ("ordered", "random")]
    start = " and ".join(backfill["start"])
    seeds = backfill["random_seeds"]
    return (f"The gallery starts as {start} vectors ({backfill['oldest_share']:.0%} {backfill['start'][0]}) and a "
            f"share is re-encoded by {backfill['new_gallery']}: first the photos the shipped scorer ranks highest "
            f"(ordered), or in random orders ({len(seeds)} seeds, {seeds[0]}..{seeds[-1]}: the row is their pointwise "
            f"median, each draw's own share in brackets). 'Reaches full at': the first share within "
            f"{backfill['tolerance']} of the fully backfilled Recall@1.\n\n" + _table(header, rows))


def _reached(order: dict[str, Any]) -> str:
    """Where a curve reaches the end; for the random orders also where each draw did."""
    each = order.get("each_reaches_full_at")
    return f"{order['reaches_full_at']:.0%}" + (f" ({', '.join(f'{r:.0%}' for r in each)})" if each else "")


def _reference_markdown(report: dict[str, Any]) -> list[str]:
    """Same-model figures of the frozen trunks (the reference) and of each trained model beside its trunk's."""
    rows = report.get("reference")
    if not rows:
        return []
    table = _table(("Model", "Trunk", "R@1", "R@5", "mAP", "R@1 - trunk's"),
                   [(_tagged(report, r["model"]) if r["trained"] else r["model"], r["trunk"], _num(r["recall@1"]),
                     _num(r["recall@5"]), _num(r["map"]), _num(r.get("vs_trunk")) if r["trained"] else "")
                    for r in rows])
    return ["## Same-model reference (each model searching a gallery it indexed itself)",
            "Frozen rows: the ImageNet trunk's pooled features, L2-normalised. Edge models never index; their "
            "row is what they would reach if they did.\n\n" + table]


def _renewals_markdown(report: dict[str, Any]) -> list[str]:
    """What renewing each changed edge device file changes for its users, when the report has a previous release."""
    if "renewals" not in report:
        return []
    rows = [(r["model"], r["previous_sha256"][:12], r["gallery"], _num(r["recall@1_previous"]), _num(r["recall@1"]),
             _num(r["nfr"]), _num(r["pfr"])) for r in report["renewals"]]
    return ["## Renewed device files (what their users see change)",
            f"Each edge model whose query file differs from the one in {report['previous_release']}: its Recall@1 "
            "with the previous file and with this release's, and the queries that flip between them.\n\n"
            + (_table(("Model", "Previous file", "Gallery", "R@1 previous", "R@1 now", "NFR", "PFR"), rows)
               if rows else "No edge model's device file changed.")]


def markdown_report(report: dict[str, Any], name: str | None = None) -> str:
    """The whole report as Markdown: matrix, ECC/AC, gaps, tax, flip rates, mixed gallery, the figures and, when
    the report has one, the frozen trunks' same-model reference."""
    name = name or report["benchmark"]
    d = report["data"]
    photos = (f"{d['queries']} photos, each querying all the others (its own photo left out)" if d.get("leave_one_out")
              else f"{d['queries']} queries ({d['old_queries']} old-class, {d['new_queries']} new-class); gallery of "
                   f"{d['gallery']} photos ({d['distractors']} distractors)")
    return "\n\n".join([
        f"# Benchmark report: {report['benchmark']}",
        f"{photos}. Case = query/gallery model generation.",
        "## Compatibility matrix", markdown_table(report), f"![Recall@1 matrix]({name}_matrix.png)",
        "## Upgrades (ECC on Recall@1 and mAP)", _ecc_markdown(report),
        "## Cross-device gap", _gap_and_tax_markdown(report),
        "## Flip rates (Recall@1)", _flips_markdown(report),
        "## Mixed gallery", _mixed_markdown(report["mixed"]), f"![Mixed gallery]({name}_mixed.png)",
        *([] if not report.get("mixed_chain") else
          ["## Three-generation mixed gallery", _mixed_markdown(report["mixed_chain"]),
           f"![Three-generation mixed gallery]({name}_mixed_chain.png)"]),
        *([] if not report.get("backfill") else
          ["## Backfill (Recall@1 against the share re-encoded)", _backfill_markdown(report["backfill"]),
           f"![Backfill]({name}_backfill.png)"]),
        *_reference_markdown(report),
        *_renewals_markdown(report),
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


def plot_mixed(report: dict[str, Any], path: Path, key: str = "mixed") -> None:
    """Recall@1 against the share of the gallery encoded by the new cloud model, one line per query model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    mixed = report[key]
    for curve in mixed["curves"] if mixed else []:
        recall = [np.nan if v is None else v for v in curve["recall@1"]]
        ax.plot(mixed["shares"], recall, marker="o", label=_tagged(report, curve["query"]))
    new = mixed["new_gallery"] if mixed else "new model"
    generations = f"{mixed['oldest']} + {mixed['old_gallery']}" if mixed and mixed.get("oldest") else ""
    ax.set(xlabel=f"share of the gallery encoded by {new}" + (f" (the rest {generations})" if generations else ""),
           ylabel="Recall@1", title=f"Mixed gallery, {report['benchmark']}")
    ax.grid(alpha=0.3)
    if mixed and mixed["curves"]:
        ax.legend()
    fig.savefig(path, dpi=120)


def plot_backfill(report: dict[str, Any], path: Path) -> None:
    """Recall@1 against the share of the gallery backfilled: the scorer's order (solid) and the median of the random
    ones (dashed)."""
    from matplotlib.figure import Figure

    backfill = report["backfill"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, curve in enumerate(backfill["curves"]):
        for name, style in (("ordered", "-"), ("random", "--")):
            values = [np.nan if v is None else v for v in curve[name]["recall@1"]]
            label = f"{curve['query']}, {'random (median)' if name == 'random' else name}"
            ax.plot(backfill["shares"], values, style, marker="o", color=f"C{i}", label=label)
    ax.set(xlabel=f"share of the gallery re-encoded by {backfill['new_gallery']}", ylabel="Recall@1",
           title=f"Backfill, {report['benchmark']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def write_report(report: dict[str, Any], out_dir: str | Path, name: str = "caltech101") -> dict[str, Path]:
    """Write <name>.json, <name>.md, <name>_matrix.png and <name>_mixed.png into `out_dir`; returns the paths."""
    out = Path(out_dir)
    json.dumps(report, allow_nan=False)  # strict JSON or a ValueError, before anything is written
    written = write(out, name, report, markdown_report(report, name))
    paths = {"json": written[0], "markdown": written[1],
             "matrix": out / f"{name}_matrix.png", "mixed": out / f"{name}_mixed.png"}
    plot_matrix(report, paths["matrix"])
    plot_mixed(report, paths["mixed"])
    if report.get("mixed_chain"):
        paths["mixed_chain"] = out / f"{name}_mixed_chain.png"
        plot_mixed(report, paths["mixed_chain"], "mixed_chain")
    if report.get("backfill"):
        paths["backfill"] = out / f"{name}_backfill.png"
        plot_backfill(report, paths["backfill"])
    return paths
