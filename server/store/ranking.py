"""The embedded store's ranking: FAISS results over-fetched and filtered through the catalogue, or an exact scan."""

from __future__ import annotations

import sqlite3

import numpy as np

from server.store.catalogue import Catalogue, Filter, Row
from server.vector_index import VectorIndex


def ranked_rows(conn: sqlite3.Connection, index: VectorIndex, query: np.ndarray, need: int, filt: Filter, dim: int,
                scan_after: int) -> tuple[list[tuple[float, int]], dict[int, Row]]:
    """The best `need` (score, id) passing `filt`, and their rows: FAISS over-fetch, else an exact scan."""
    n = need if not filt.sql and not index.tombstone_share else max(4 * need, 64)
    scan_after = max(16 * need, scan_after)
    passed: dict[int, float] = {}
    rows: dict[int, Row] = {}
    seen: set[int] = set()
    while True:
        found = index.search(query, n)
        fresh = [(float(s), int(i)) for s, i in zip(found.scores, found.ids, strict=True) if int(i) not in seen]
        seen.update(i for _, i in fresh)
        got = Catalogue.rows(conn, [i for _, i in fresh], filt)
        rows.update(got)
        passed.update((i, s) for s, i in fresh if i in got)
        if len(passed) >= need or found.asked >= index.ntotal == found.returned:
            break  # enough, or every entry in the index was ranked
        gave_up = found.returned < found.asked  # an ANN index found no more at its search setting
        if gave_up or n >= scan_after:
            if filt.sql:
                ranked = Catalogue.scan(conn, query, need, filt, dim)
                return ranked, Catalogue.rows(conn, [i for _, i in ranked], Filter())
            if gave_up:
                break
        n *= 4
    ranked = sorted(((s, i) for i, s in passed.items()), key=lambda t: (-t[0], t[1]))
    return ranked[:need], rows
