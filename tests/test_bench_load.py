"""`concord bench load` on the tiny release: every point of both servers measured without errors, the recovery
rows and the reports written (the figures themselves are for the README, not for asserting)."""

from __future__ import annotations

import json
from pathlib import Path

from server.bench.load import CLIENTS, INDEXES, KINDS, LoadPlan, main

TINY = LoadPlan(gallery=200, seconds=0.3, warmup=0.1, ingests=300, snapshot_every=100)


def test_bench_load_measures_both_servers_and_recovery(tiny_release: Path, tmp_path: Path) -> None:
    report = main(release=tiny_release, out=tmp_path, plan=TINY)
    points = report["points"]
    assert {(p["server"], p["kind"], p["clients"]) for p in points} == {
        (s, k, c) for s in ("all cores", "one core") for k in KINDS for c in CLIENTS}
    assert all(p["requests"] > 0 and p["errors"] == 0 for p in points), points
    for kind in INDEXES:
        never, periodic = (next(r for r in report["recovery"] if r["snapshot_every"] == e and r["index"] == kind)
                           for e in (0, 100))
        assert never["replayed"] == 300 and periodic["replayed"] <= 100 and never["photos"] == 300
    assert json.loads((tmp_path / "load.json").read_text())["plan"]["ingests"] == 300
    assert "| embedding | 8 |" in (tmp_path / "load.md").read_text()
