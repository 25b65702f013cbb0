"""The benchmark summary: `summary.md` (tables a README can quote) and small PNG plots, from the part reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.benchmark.report import context_markdown, figure, fmt, table, write_text

PARTS = ("search", "encode", "upgrade")


def load_parts(out: Path) -> dict[str, dict[str, Any]]:
    """The part reports present in `out` (search.json, encode.json, upgrade.json)."""
    found = {}
    for part in PARTS:
        path = out / f"{part}.json"
        if path.is_file():
            found[part] = json.loads(path.read_text())
    return found


def write_all(out: Path) -> list[Path]:
    """Write the plots and summary.md for the part reports in `out`; returns the written paths."""
    parts = load_parts(out)
    written = []
    if "search" in parts:
        written.append(figure(out / "search_recall_latency.png", lambda ax: _plot_search(ax, parts["search"])))
        if any(r.get("api") for r in parts["search"]["sizes"]):
            written.append(figure(out / "search_api_overhead.png", lambda ax: _plot_api(ax, parts["search"])))
    if "upgrade" in parts:
        written.append(figure(out / "upgrade_vs_backfill.png", lambda ax: _plot_upgrade(ax, parts["upgrade"])))
    written.append(write_text(out / "summary.md", summary_markdown(parts)))
    return written


# ----- plots ----------------------------------------------------------------------------------------------------

def _plot_search(ax: Any, search: dict[str, Any]) -> None:
    k = search["plan"]["k"]
    markers = {"flat": "s", "hnsw": "o", "ivf": "^"}
    for row, colour in zip(search["sizes"], ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"),
                           strict=False):
        for family, marker in markers.items():
            points = [v for v in row["variants"] if v["family"] == family]
            if points:
                ax.plot([v["latency_ms"]["p99"] for v in points], [v[f"recall@{k}"] for v in points],
                        marker=marker, color=colour, linestyle="-" if family != "flat" else "none", markersize=4,
                        label=f"{family} {row['gallery']:,}")
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(10.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set(xlabel="p99 latency, batch 1, one thread (ms)", ylabel=f"recall@{k} vs flat",
           title="Search: recall against tail latency")
    ax.legend(fontsize=6, ncol=3, loc="lower right")
    ax.grid(alpha=0.3)


def _plot_api(ax: Any, search: dict[str, Any]) -> None:
    rows = [r for r in search["sizes"] if r.get("api")]
    names = list(rows[0]["api"]["latency_ms"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(rows))], [r["api"]["latency_ms"][name]["p50"] for r in rows],
               width=width, label=name.replace("_", " "))
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))],
                  [f"{r['gallery']:,}" for r in rows])
    ax.set_yscale("log")
    ax.set(xlabel="gallery vectors (flat index)", ylabel="p50 latency (ms)",
           title="Flat search: HTTP API vs bare FAISS")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _plot_upgrade(ax: Any, upgrade: dict[str, Any]) -> None:
    sizes = [r["gallery"] for r in upgrade["sizes"]]
    ax.plot(sizes, [r["service"]["latency_ms"]["p50"] / 1000 for r in upgrade["sizes"]], marker="o",
            label="upgrade (service, p50)")
    http = [r["http"]["http_wall_s"] for r in upgrade["sizes"] if r.get("http")]
    if len(http) == len(sizes):
        ax.plot(sizes, http, marker="s", label="upgrade (HTTP, once)")
    ax.plot(sizes, [r["backfill_s"] for r in upgrade["sizes"]], marker="^", label="full backfill (estimate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="gallery photos", ylabel="seconds", title=f"Upgrade {upgrade['old_model']} -> "
           f"{upgrade['new_model']} vs backfill")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


# ----- markdown -------------------------------------------------------------------------------------------------

def summary_markdown(parts: dict[str, dict[str, Any]]) -> str:
    """The whole summary: headline, then each part present, then where each figure came from."""
    text = "# Concord performance\n\n"
    if not parts:
        return text + "No benchmark reports yet: run `concord bench all`.\n"
    text += _headline(parts) + "\n"
    if "search" in parts:
        text += _search_markdown(parts["search"]) + "\n"
    if "encode" in parts:
        text += _encode_markdown(parts["encode"]) + "\n"
    if "upgrade" in parts:
        text += _upgrade_markdown(parts["upgrade"]) + "\n"
    text += "## Runs\n\n"
    for name, part in parts.items():
        quick = " (QUICK mode: small sizes, for checking the command, not for quoting)" \
            if part["plan"]["name"] == "quick" else ""
        took = f"- wall time: {part['seconds']:.0f} s\n" if "seconds" in part else ""
        text += f"### {name}{quick}\n\n" + context_markdown(part) + took + "\n"
    return text


def _headline(parts: dict[str, dict[str, Any]]) -> str:
    rows = []
    search = parts.get("search")
    if search:
        k = search["plan"]["k"]
        api = search["targets"]["api_flat_p50_within_1_5x"]
        if api.get("measured"):
            where = f"{api['gallery']:,} vectors" + ("" if api["at_target_size"] else " (not the 1M of the target)")
            rows.append(["flat search p50 via HTTP API / bare FAISS (the server's FAISS threads)", where,
                         f"{api['ratio_p50']:.2f}x", "<= 1.5x", _verdict(api["passed"])])
            one = api["ratio_p50_vs_bare_1_thread"]
            rows.append(["flat search p50 via HTTP API / bare FAISS on 1 thread (its fastest batch-1 setting)", where,
                         f"{one:.2f}x", "<= 1.5x", _verdict(one <= 1.5)])
        approx = search["targets"]["approximate_recall_0_95_p99_under_10ms"]
        best = approx["best"]
        rows.append([f"best approximate index with recall@{k} >= 0.95", f"{approx['gallery']:,} vectors",
                     f"{best['name']}: p99 {best['p99_ms']:.2f} ms, recall {best[f'recall@{k}']:.3f}" if best
                     else "none reached 0.95", "p99 < 10 ms", _verdict(approx["passed"])])
    encode = parts.get("encode")
    if encode:
        for row in encode["cloud"]:
            rows.append([f"cloud encoder {row['model_id']} photos/s (batch {row['batch']}, with decoding)", "-",
                         f"{row['photos_per_s_with_decoding']:.1f}", "-", "-"])
        if encode.get("api_ingest"):
            ingest = encode["api_ingest"]
            rows.append(["ingest via POST /v1/photos / bare encoder", f"{ingest['model_id']}",
                         f"{ingest['photos_per_s_api']:.1f} vs {ingest['photos_per_s_bare_encoder']:.1f} photos/s "
                         f"({ingest['ratio_api_over_bare']:.2f}x)", "-", "-"])
    upgrade = parts.get("upgrade")
    if upgrade:
        last = upgrade["sizes"][-1]
        rows.append([f"upgrade {upgrade['old_model']} -> {upgrade['new_model']} vs full backfill",
                     f"{last['gallery']:,} photos", f"{last['service']['latency_ms']['p50']:.1f} ms vs "
                     f"{_duration(last['backfill_s'])} ({last['backfill_over_upgrade']:,.0f}x)", "-", "-"])
    return "## Headline\n\n" + table(["figure", "at", "measured", "target", "verdict"], rows) + _threads_note(search)


def _threads_note(search: dict[str, Any] | None) -> str:
    """Why the API can be slower than single-threaded FAISS: the server's FAISS threading, with the figures."""
    rows = [r for r in (search or {}).get("sizes", []) if r.get("api")]
    if not rows:
        return ""
    api = rows[-1]["api"]
    lat = api["latency_ms"]
    many = next(name for name in lat if name.startswith("bare_") and name != "bare_1_thread")
    return (f"\nAt {api['gallery']:,} vectors the HTTP layer adds {api['overhead_ms_p50_vs_same_threads']:.1f} ms at "
            f"p50 to the same FAISS search; the server runs FAISS on {api['server_faiss_threads']} thread(s) "
            f"(`--faiss-threads`), and a batch-1 flat search here takes {lat['bare_1_thread']['p50']:.1f} ms on one "
            f"thread against {lat[many]['p50']:.1f} ms on one per core.\n")


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else "met" if passed else "MISSED"


def _duration(seconds: float) -> str:
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _search_markdown(search: dict[str, Any]) -> str:
    k = search["plan"]["k"]
    data = search["data"]
    text = (f"## Search ({data['dim']}-d, k={k}, batch-1 queries)\n\n"
            f"Vectors: {data['source']}; {data['normalised']}.{_fidelity(data)} Queries: {data['queries']} "
            f"({search['plan']['queries']} of them). Latency: one FAISS thread, every query through every "
            f"variant in turn (interleaved); QPS all threads: {search['sizes'][0]['threads_all']} concurrent "
            f"batch-1 streams. Recall@{k} against the exact (flat) neighbours, tie-aware.\n\n")
    for row in search["sizes"]:
        text += (f"### {row['gallery']:,} vectors (median cosine to the 1st / {k}th neighbour "
                 f"{row['median_top1_cosine']:.3f} / {row[f'median_top{k}_cosine']:.3f})\n\n")
        text += table(["index", "p50 ms", "p99 ms", "QPS 1 thread", "QPS all threads", f"recall@{k}"],
                      [[v["name"], fmt(v["latency_ms"]["p50"], 3), fmt(v["latency_ms"]["p99"], 3),
                        fmt(v["qps_1_thread"], 0), fmt(v.get("qps_all_threads"), 0), fmt(v[f"recall@{k}"], 3)]
                       for v in row["variants"]]) + "\n"
    text += "### Memory per million vectors\n\n"
    mem_rows = []
    for row in search["sizes"]:
        for m in row["memory"].values():
            mem_rows.append([f"{row['gallery']:,}", m["type"], fmt(m["serialized_mb_per_million"], 0),
                             fmt(m["rss_delta_mb_per_million"], 0), fmt(m["build_s"], 2)])
    text += table(["gallery", "index", "serialised MiB / 1M", "RSS delta MiB / 1M", "build s"], mem_rows)
    dim = search["plan"]["dim"]
    text += ("\nSerialised size: `faiss.serialize_index`. RSS delta: the process's resident memory after the "
             f"build minus before (large frees go back to the OS first); raw float32 vectors are "
             f"{dim * 4e6 / 2**20:.0f} MiB per million at {dim}-d.\n\n")
    api_rows = [r for r in search["sizes"] if r.get("api")]
    if api_rows:
        text += _api_markdown(api_rows)
    return text


def _fidelity(data: dict[str, Any]) -> str:
    f = data.get("fidelity")
    if not f:
        return ""
    return (f" Shape check: the median cosine of a vector to its nearest neighbour is {f['real_median_nn_cosine']:.3f} "
            f"among the {f['compared_vectors']:.0f} real embeddings and {f['synthetic_median_nn_cosine']:.3f} among "
            f"as many synthetic ones.")


def _api_markdown(rows: list[dict[str, Any]]) -> str:
    threads = rows[0]["threads_all"]
    text = ("### HTTP API against bare FAISS (flat index, batch 1)\n\n"
            f"`POST /v1/search/embedding` on a real `concord serve` (uvicorn, loopback, one keep-alive connection) "
            f"whose store holds the same vectors, against `IndexIDMap2(IndexFlatIP).search` in this process on "
            f"the same vectors, with FAISS on 1 and on {threads} threads (the server runs "
            f"{rows[0]['api']['server_faiss_threads']}, its `--faiss-threads`); the three interleaved query by query."
            f"\n\n")
    table_rows = []
    for row in rows:
        api = row["api"]
        lat = api["latency_ms"]
        bare_n = next(v for name, v in lat.items() if name.startswith("bare_") and name != "bare_1_thread")
        table_rows.append([f"{api['gallery']:,}", str(api["dim"]), fmt(lat["api"]["p50"], 3),
                           fmt(lat["api"]["p99"], 3), fmt(bare_n["p50"], 3), fmt(lat["bare_1_thread"]["p50"], 3),
                           fmt(api["ratio_p50_api_over_bare_same_threads"], 2),
                           fmt(api["ratio_p50_api_over_bare_1_thread"], 2),
                           fmt(api["top_k_agreement_api_vs_bare"], 3),
                           f"{api['store']['seconds']:.0f} s ({api['store']['vectors_per_s']:,.0f}/s)"])
    text += table(["gallery", "dim", "API p50 ms", "API p99 ms", f"bare {threads} thr p50", "bare 1 thr p50",
                   "API / bare same threads", "API / bare 1 thread", "top-k agreement", "store fill"], table_rows)
    return text + f"\nStores filled by: {rows[0]['api']['store']['route']}.\n"


def _encode_markdown(encode: dict[str, Any]) -> str:
    text = (f"## Encoding ({encode['photos']} real photos from `{encode['photo_source']}`)\n\n"
            "Cloud encoders, batch of {batch}, onnxruntime on all cores; each batch through every model in turn:\n\n"
            .format(batch=encode["config"]["batch"]))
    text += table(["model", "arch", "crop", "photos/s with decoding", "photos/s encoder only",
                   "batch p50 ms (decoding)"],
                  [[r["model_id"], str(r["arch"]), str(r["crop"]), fmt(r["photos_per_s_with_decoding"], 1),
                    fmt(r["photos_per_s_encoder_only"], 1), fmt(r["batch_ms_with_decoding"]["p50"], 1)]
                   for r in encode["cloud"]])
    edge = encode["edge"]
    if edge.get("skipped"):
        text += f"\nEdge encoder: not measured ({edge['skipped']}).\n"
        return text + _ingest_markdown(encode)
    text += (f"\nEdge encoder, batch 1, one thread, {edge['rounds']} interleaved rounds (photo `{edge['photo']}`)"
             + (f"; {edge['note']}" if edge.get("note") else "") + ":\n\n")
    text += table(["file", "model", "variant", "MB", "median ms", "p90 ms", "preprocess ms"],
                  [[r["name"], r["model_id"], r["variant"], fmt(r["size_bytes"] / 1e6, 2),
                    fmt(r["latency_ms"]["median"], 3), fmt(r["latency_ms"]["p90"], 3),
                    fmt(r["preprocess_ms"]["median"], 3)] for r in edge["models"]])
    return text + _ingest_markdown(encode)


def _ingest_markdown(encode: dict[str, Any]) -> str:
    ingest = encode.get("api_ingest")
    text = ""
    if ingest:
        text += (f"\nIngest through `POST /v1/photos` (batches of {ingest['batch']}, {ingest['batches']} timed, fresh "
                 f"store, active model {ingest['model_id']}) against the bare encoder on the same batches "
                 f"(decode + encode), interleaved: **{ingest['photos_per_s_api']:.1f} vs "
                 f"{ingest['photos_per_s_bare_encoder']:.1f} photos/s ({ingest['ratio_api_over_bare']:.2f}x)**; "
                 f"{ingest['photos_added']} photos added.\n")
    return text


def _upgrade_markdown(upgrade: dict[str, Any]) -> str:
    rate = upgrade["backfill_rate"]
    text = (f"## Upgrade without re-indexing ({upgrade['old_model']} -> {upgrade['new_model']})\n\n"
            f"Upgrade: `Service.upgrade` (what `POST /v1/models/upgrade` calls: the compatibility gate, loading "
            f"and sha256-checking the new model, recording it), {upgrade['sizes'][0]['service']['repeats']} times "
            f"per size with a fresh release object each time; also once over HTTP on a real server. Backfill: "
            f"gallery size / {rate['photos_per_s']:.1f} photos/s ({rate['source']}).\n\n")
    rows = []
    for r in upgrade["sizes"]:
        http = r.get("http") or {}
        rows.append([f"{r['gallery']:,}", fmt(r["service"]["latency_ms"]["p50"], 1),
                     fmt(r["service"]["latency_ms"]["max"], 1),
                     fmt(http.get("http_wall_s", 0) * 1000, 1) if http else "-",
                     str(http.get("reencoded", "-")), str(r["service"]["vectors_untouched"]),
                     _duration(r["backfill_s"]), f"{r['backfill_over_upgrade']:,.0f}x"])
    text += table(["gallery", "upgrade p50 ms", "upgrade max ms", "HTTP upgrade ms", "re-encoded",
                   "vectors untouched", "full backfill", "backfill / upgrade"], rows)
    g = upgrade["growth"]
    text += (f"\nUpgrade time from the smallest to the largest gallery ({g['size_ratio']:.0f}x more photos): "
             f"x{g['largest_over_smallest']:.2f}; log-log slope {g['log_log_slope']:.3f} (0 = does not grow, "
             f"1 = linear).\n\n")
    return text + _mixed_markdown(upgrade["mixed_gallery"])


def _mixed_markdown(mixed: dict[str, Any]) -> str:
    text = "### Search quality during an optional partial backfill (mixed gallery)\n\n"
    if not mixed.get("available"):
        return text + f"Missing: {mixed['reason']}.\n"
    shares = mixed["shares"]
    text += (f"From `{mixed['source']}`: a share p of the gallery encoded by {mixed['new_gallery']}, the rest by "
             f"{mixed['old_gallery']}, in one index.\n\n")
    rows = []
    for curve in mixed["curves"]:
        for metric, values in curve.items():
            if metric != "query":
                rows.append([str(curve["query"]), metric, *(fmt(v, 3) for v in values)])
    return text + table(["query model", "metric", *(f"p={p:g}" for p in shares)], rows)
