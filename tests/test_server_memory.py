"""Peak memory of a real server process stays bounded under the uploads that once exhausted it: 24 single-colour
PNGs just under the 40 MP guard in one request (4.2 GB RSS before photos were decoded in bounded batches), 256 such
photos in one request (refused by their headers before any decode) and 256 small ones; the server keeps answering."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import httpx

from tests.server_helpers import WRITE, ServerProcess, bomb_png, make_photo

SIDE = 6324
"""6324 x 6324 = 39,992,976 pixels: just under the 40 MP decompression-bomb guard."""
PEAK_BOUND_MB = 600
"""Stated bound on what the requests may add to the server's peak RSS (VmHWM) over its RSS before them: one
full-size decode at a time (120 MB of RGB at the guard) plus its preprocessing, plus the request bodies."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def flat_png(colour: tuple[int, int, int], side: int = SIDE) -> bytes:
    """A single-colour RGB PNG of side x side pixels, written row by row (the test never holds its pixels)."""
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(b"\x00" + bytes(colour) * side)]
    up = b"\x02" + bytes(3 * side)  # filter 'Up': every later row repeats the first
    parts.extend(compressor.compress(up) for _ in range(side - 1))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def rss_mb(pid: int, field: str) -> float:
    """A memory figure of a process from /proc (VmRSS now, VmHWM its peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


def test_huge_and_many_photo_uploads_keep_the_server_small_and_answering(tiny_release: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_release, tmp_path / "data")
    server.env["CONCORD_MAX_REQUEST_PIXELS"] = str(25 * SIDE * SIDE)  # accept them all: decode every pixel
    server.start()
    try:
        assert server.pid is not None
        with httpx.Client(base_url=server.url, headers=WRITE, timeout=600) as http:
            warm = http.post("/v1/photos", files=[("files", ("warm.jpg", make_photo(0), "image/jpeg"))])
            assert warm.status_code == 200, warm.text
            before = rss_mb(server.pid, "VmRSS")
            pngs = [("files", (f"flat{i}.png", flat_png((i * 10, 255 - i * 10, 128)), "image/png"))
                    for i in range(24)]
            answer = http.post("/v1/photos", files=pngs, data={"metadata": '{"album": "flat"}'})
            assert answer.status_code == 200, answer.text
            assert answer.json()["added"] == 24
            claims = [("files", (f"big{i}.png", bomb_png(SIDE, SIDE - i), "image/png")) for i in range(256)]
            refused = http.post("/v1/photos", files=claims)  # 256 photos near the guard: 10 GP by their headers
            assert refused.status_code == 413 and "CONCORD_MAX_REQUEST_PIXELS" in refused.text, refused.text
            many = [("files", (f"m{i}.jpg", make_photo(1000 + i), "image/jpeg")) for i in range(256)]
            answer = http.post("/v1/photos", files=many)
            assert answer.status_code == 200, answer.text
            assert answer.json()["added"] == 256
            peak = rss_mb(server.pid, "VmHWM")
            print(f"server RSS before {before:.0f} MB, peak {peak:.0f} MB (+{peak - before:.0f} MB)")
            assert peak - before < PEAK_BOUND_MB, f"peak RSS {peak:.0f} MB, {peak - before:.0f} MB over {before:.0f}"
            assert http.get("/readyz").status_code == 200
            assert http.get("/v1/stats").json()["photos"] == 1 + 24 + 256
            found = http.post("/v1/search/embedding", json={"vector": [1.0] + [0.0] * 31, "model_id": "cloud-v1",
                                                            "filter": {"album": "flat"}, "k": 30})
            assert found.status_code == 200 and len(found.json()["hits"]) == 24, found.text
    finally:
        server.stop()
