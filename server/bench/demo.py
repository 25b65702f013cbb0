"""`concord demo`: the first ten minutes. Index photos, search from the device, upgrade with no re-indexing.

It starts the real server (`concord serve` in a child process on a free loopback port) on a temporary (or named,
empty) data folder with the shipped release, indexes photos with the oldest cloud model, searches with a
near-duplicate photo encoded on the "device" by the oldest edge model (only its embedding goes over HTTP),
upgrades the server through the API to each newer cloud model in turn (the gate's verdict, the time, and the
count of photos encoded before and after: nothing is re-encoded), indexing more photos with each, and searches
again from the newest edge model and from the old one: the old photos are still found, beside the new ones.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from PIL import Image

BUNDLED_FIRST = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "coins", "moon")
BUNDLED_LATER = ("immunohistochemistry", "retina", "colorwheel", "clock", "page")
QUERY_PHOTO = "chelsea"
"""The gallery photo whose near-duplicate is the query (with `--photos`: the first photo)."""
QUERY_KEEP, QUERY_SCALE, QUERY_QUALITY = 0.9, 0.6, 60


class DemoError(RuntimeError):
    """The demo cannot run (no photos, a data folder in use, a missing package)."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on."""

    release: Path
    data_dir: Path | None = None
    """An empty (or absent) folder for the store; None: a temporary folder, removed at the end."""
    photos: Path | None = None
    """A folder of the user's photos; None: scikit-image's bundled photos."""
    k: int = 3
    threads: int | None = None


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def bundled_photos() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """scikit-image's bundled photos as JPEG bytes: the first batch and the later one."""
    try:
        from skimage import data
    except ImportError:
        raise DemoError("the demo's photos ship with scikit-image: `pip install scikit-image`, or pass --photos DIR "
                        "(a folder of your own photos)") from None

    def load(names: tuple[str, ...]) -> list[tuple[str, bytes]]:
        import numpy as np

        return [(name, jpeg(Image.fromarray(np.asarray(getattr(data, name)())))) for name in names]

    return load(BUNDLED_FIRST), load(BUNDLED_LATER)


def folder_photos(folder: Path) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The photos of a folder (recursively), two thirds for the first batch and the rest for the later one."""
    from edge.photos import PhotoSourceError, list_photos

    try:
        paths = list_photos(folder)
    except PhotoSourceError as err:
        raise DemoError(str(err)) from None
    if len(paths) < 3:
        raise DemoError(f"{folder}: the demo needs at least 3 photos (it found {len(paths)})")
    photos = [(str(p.relative_to(folder)), p.read_bytes()) for p in paths]
    cut = max(2, (2 * len(photos)) // 3)
    return photos[:cut], photos[cut:]


def query_photo(data: bytes) -> bytes:
    """A near-duplicate of a photo (not in the gallery): crop to 90% centre, resize 0.6x, JPEG quality 60."""
    from models.benchmark.transforms import recompress
    from models.preprocess import load_image

    image = load_image(data)
    width, height = image.size
    crop_w, crop_h = round(width * QUERY_KEEP), round(height * QUERY_KEEP)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    size = (max(1, round(crop_w * QUERY_SCALE)), max(1, round(crop_h * QUERY_SCALE)))
    return recompress(image, (left, top, left + crop_w, top + crop_h), size, QUERY_QUALITY)


def table(headers: list[str], rows: list[list[str]], indent: str = "   ") -> str:
    """A plain-text table with columns as wide as their widest cell."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(indent + line for line in lines)


class Demo:
    """The demo's steps against one running server."""

    def __init__(self, config: DemoConfig, server: Any, work: Path, say: Callable[[str], None]) -> None:
        from models.release import Release
        self.config, self.server, self.work, self.say = config, server, work, say
        self.release = Release.load(config.release)
        manifest = self.release.manifest
        space = manifest.spaces[manifest.newest("edge").space]
        self.match = "duplicate" if space.fingerprint else "similar"
        """The query is a copy of a photo: search for duplicates when the space has a photo fingerprint."""

    def index(self, photos: list[tuple[str, bytes]]) -> list[list[str]]:
        """POST the photos with metadata {"name"}; rows of (id, photo, model that encoded it)."""
        answer = self.server.client.add_photos(photos, [{"name": name} for name, _ in photos])
        rows = []
        for (name, _), photo in zip(photos, answer["photos"], strict=True):
            note = " (already stored)" if photo["duplicate"] else ""
            rows.append([str(photo["id"]), name, photo["model_id"] + note])
        return rows

    def search(self, query: Path, edge_id: str) -> tuple[list[list[str]], str, str]:
        """Encode the query photo on the device with `edge_id` and search with its embedding only."""
        from edge.client import encode_photos

        start = time.perf_counter()
        encoded = encode_photos(self.release.folder, [query], model_id=edge_id, threads=self.config.threads)
        took = (time.perf_counter() - start) * 1000
        result = self.server.client.search_embedding(encoded.vectors[0], edge_id, k=self.config.k, match=self.match)
        rows = [[str(rank), str(hit.metadata.get("name", hit.id)), f"{hit.score:.3f}", hit.model_id]
                for rank, hit in enumerate(result.hits, 1)]
        top = str(result.hits[0].metadata.get("name")) if result.hits else ""
        searched = ", ".join(result.searched_models)
        return rows, top, (f"{edge_id} ({encoded.variant} file, {encoded.vectors.shape[1]}-d embedding, "
                           f"{took:.0f} ms with loading) searched gallery vectors of {searched} in {self.match} "
                           f"match")

    def run(self, first: list[tuple[str, bytes]], later: list[tuple[str, bytes]], query_of: str) -> bool:
        """Every step; True when each search found the query's original first."""
        manifest, say = self.release.manifest, self.say
        clouds = [entry.id for entry in manifest.of_role("cloud")]
        old_edge, new_edge = manifest.oldest("edge").id, manifest.newest("edge").id
        say(f"\n1. Index {len(first)} photos; the server encodes them with {clouds[0]}")
        say(table(["id", "photo", "encoded by"], self.index(first)))
        query = self.work / "query.jpg"
        original = dict(first)[query_of]
        query.write_bytes(query_photo(original))
        say(f"\n2. Search from the device. Query: '{query_of}' cropped to {QUERY_KEEP:.0%}, resized "
            f"{QUERY_SCALE:g}x, JPEG quality {QUERY_QUALITY} (not in the gallery); only its embedding is sent")
        tops = {}
        rows, tops[f"{old_edge} before"], note = self.search(query, old_edge)
        say(f"   {note}")
        say(table(["rank", "photo", "score", "gallery model"], rows))
        step, upgrades = 3, list(pairwise(clouds))
        for n, (old_cloud, new_cloud) in enumerate(upgrades):
            batch = later[n * len(later) // len(upgrades):(n + 1) * len(later) // len(upgrades)]
            active = self.upgrade(step, old_cloud, new_cloud)
            say(f"\n{step + 1}. Index {len(batch)} more photos; the server now encodes them with {active}")
            say(table(["id", "photo", "encoded by"], self.index(batch)))
            step += 2
        say(f"\n{step}. The same query after the upgrade, from the new app ({new_edge}) and an old one ({old_edge})")
        for edge_id in dict.fromkeys((new_edge, old_edge)):
            rows, tops[f"{edge_id} after"], note = self.search(query, edge_id)
            say(f"   {note}")
            say(table(["rank", "photo", "score", "gallery model"], rows))
        stats = self.server.client.stats()
        found = all(top == query_of for top in tops.values())
        say("\n" + table(["search", "top hit", "original found"],
                         [[name, top, "yes" if top == query_of else "NO"] for name, top in tops.items()], indent=""))
        say(f"\ngallery: {json.dumps(stats['vectors'])} vectors; photos encoded by the server in all: "
            f"{stats['encoded_photos']} (= {len(first)} + {len(later)} indexed, nothing re-encoded)")
        return found

    def upgrade(self, step: int, old_cloud: str, new_cloud: str) -> str:
        """Put `new_cloud` live through the API and show the gate's verdict and that nothing was re-encoded."""
        say = self.say
        say(f"\n{step}. Upgrade the server: {old_cloud} -> {new_cloud} (POST /v1/models/upgrade)")
        before = self.server.client.stats()
        start = time.perf_counter()
        answer = self.server.client.upgrade(new_cloud)
        took = time.perf_counter() - start
        after = self.server.client.stats()
        gate = answer.get("gate") or {}
        say(f"   gate: {'PASSED' if gate.get('passed') else 'not run'}: {gate.get('reason', answer.get('message'))}")
        for check in gate.get("checks", []):
            say(f"     {'ok  ' if check['passed'] else 'FAIL'} {check['name']}: {check['measured']} vs "
                f"{check['threshold']}")
        say(f"   took {took * 1000:.0f} ms over HTTP ({answer['seconds'] * 1000:.1f} ms in the server); photos "
            f"re-encoded: {after['encoded_photos'] - before['encoded_photos']} (the server's encoder count "
            f"{before['encoded_photos']} -> {after['encoded_photos']}); {before['vectors_total']} stored vectors kept "
            f"as they were")
        return str(answer["active_model"])


def run_demo(config: DemoConfig, say: Callable[[str], None] = print) -> int:
    """Run the demo; 0 when every search found the original first, 1 otherwise."""
    from server.bench.driver import Server

    first, later = folder_photos(config.photos) if config.photos else bundled_photos()
    query_of = QUERY_PHOTO if config.photos is None else first[0][0]
    if not (config.release / "manifest.json").is_file():
        raise DemoError(f"no release at {config.release} (no manifest.json): pass --release")
    work = Path(tempfile.mkdtemp(prefix="concord-demo-"))
    data_dir = config.data_dir or work / "data"
    if data_dir.exists() and any(data_dir.iterdir()):
        shutil.rmtree(work, ignore_errors=True)
        raise DemoError(f"{data_dir}: not empty; the demo needs an empty (or absent) data folder")
    try:
        from models.manifest import Manifest
        old_cloud = Manifest.load(config.release).oldest("cloud").id
        start = time.perf_counter()
        with Server(config.release, data_dir, work / "server.log", model=old_cloud, threads=config.threads,
                    start_timeout=120) as server:
            say(f"Concord demo: server {server.url} started in {time.perf_counter() - start:.1f} s with release "
                f"{config.release}, store in {data_dir}")
            found = Demo(config, server, work, say).run(first, later, query_of)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if found:
        say("\nThe upgrade re-encoded nothing, and every search, from the new app and the old one, found the "
            "original photo first.")
        return 0
    say("\nNOT every search found the original photo first (see the tables above).")
    return 1


def main(release: Path | None, data_dir: Path | None, photos: Path | None, threads: int | None = None) -> int:
    """`concord demo`: resolve the release (CONCORD_RELEASE, else the shipped one), run, return the exit code."""
    import sys

    from server.settings import Settings

    config = DemoConfig(release=release or Settings.from_env().release, data_dir=data_dir, photos=photos,
                        threads=threads)
    try:
        return run_demo(config)
    except DemoError as err:
        print(f"concord: {err}", file=sys.stderr)
        return 2
