"""Where the search page's files are: the page itself (package data beside this module) and onnxruntime-web's
browser build, which npm installs into the project's `node_modules` (`npm ci`; `make serve` runs it).

Only the files the page needs are served, each by its plain name: a request can never name another file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
"""The page: index.html and its ES modules and style sheet (no build step)."""
PROJECT = Path(__file__).resolve().parents[2]
"""The project folder (where package.json and node_modules lie in a checkout)."""
ORT_PACKAGE = "onnxruntime-web"
ORT_DIR_VARIABLE = "CONCORD_ORT_DIR"
"""Names onnxruntime-web's package folder when it is not in a node_modules the server looks in."""
ORT_MODULE = "ort.wasm.min.mjs"
"""onnxruntime-web's ES module with the WebAssembly backend only (no WebGPU/WebGL: WebGPU has int8 bugs)."""
ORT_FILES = (ORT_MODULE, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
"""Everything the WebAssembly backend loads: the module, the wasm runtime's loader and the runtime itself."""
ORT_HINT = ("onnxruntime-web is not installed beside this server: run `npm ci` in the Concord project folder "
            "(`make serve` does it) and reload the page; until then searches send the photo to the server")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml", ".wasm": "application/wasm", ".png": "image/png"}


@dataclass(frozen=True)
class OrtAssets:
    """onnxruntime-web's files as found on this machine: the folder, the installed version and what is missing."""

    folder: Path | None
    version: str | None
    missing: tuple[str, ...] = field(default_factory=tuple)

    @property
    def available(self) -> bool:
        """Every file the page needs is there."""
        return self.folder is not None and not self.missing

    def to_dict(self) -> dict[str, object]:
        """What the page is told (no server paths)."""
        return {"available": self.available, "package": ORT_PACKAGE, "version": self.version,
                "missing": list(self.missing), "module": f"/web/ort/{ORT_MODULE}", "wasm_paths": "/web/ort/",
                "hint": None if self.available else ORT_HINT}


def ort_candidates() -> list[Path]:
    """Folders that may hold onnxruntime-web's package: $CONCORD_ORT_DIR alone when set, else the project's
    node_modules, then the current folder's."""
    given = os.environ.get(ORT_DIR_VARIABLE, "").strip()
    if given:
        return [Path(given).expanduser()]
    folders = [PROJECT / "node_modules" / ORT_PACKAGE, Path.cwd() / "node_modules" / ORT_PACKAGE]
    return list(dict.fromkeys(folders))


def find_ort() -> OrtAssets:
    """Look for onnxruntime-web's browser files now (cheap: a few stat calls), so `npm ci` needs no restart."""
    best: OrtAssets | None = None
    for package in ort_candidates():
        dist = package / "dist"
        if not dist.is_dir():
            continue
        missing = tuple(name for name in ORT_FILES if not (dist / name).is_file())
        found = OrtAssets(dist, _version(package), missing)
        if found.available:
            return found
        best = best or found
    return best or OrtAssets(None, None, ORT_FILES)


def _version(package: Path) -> str | None:
    try:
        version = json.loads((package / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return str(version) if version else None


def static_file(name: str) -> Path | None:
    """The page's own file called `name` (a plain name of a file in STATIC), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = STATIC / name
    return path if path.is_file() and path.suffix in MEDIA_TYPES else None


def ort_file(name: str) -> Path | None:
    """onnxruntime-web's file called `name` when it is one the page needs and is installed, else None."""
    assets = find_ort()
    if name not in ORT_FILES or assets.folder is None or name in assets.missing:
        return None
    return assets.folder / name


def media_type(path: Path) -> str:
    """The Content-Type of one of the page's files."""
    return MEDIA_TYPES.get(path.suffix, "application/octet-stream")
