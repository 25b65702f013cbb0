"""`concord web-bench`: how long the search page takes to encode a photo in the browser, beside onnxruntime in
Python on the same photos, the same model file and the same machine, and how close the two embeddings are.

A real `concord serve` serves the page; headless Chromium (the system's, driven by Playwright) opens it and the
page encodes each photo with the edge model's int8 device file on onnxruntime-web's WebAssembly backend. Rounds
interleave one browser encode and one Python encode (onnxruntime, one thread: the page's WebAssembly runs on one
thread here) so a busy moment of a shared machine hits both alike. Figures are medians; nothing asserts a speed.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.benchmark import report

STEM = "web_bench"
DEFAULT_OUT = Path("reports/web")
TIMINGS = ("browser_ms", "browser_total_ms", "python_ms", "python_total_ms")


def parity_photos() -> dict[str, bytes]:
    """Real photos of several sizes and kinds, from scikit-image's bundled ones: JPEGs as they ship, a greyscale
    JPEG, an enlarged and a shrunk copy (upsampling below the model's input size), and a PNG."""
    from PIL import Image
    from skimage import data

    def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return buffer.getvalue()

    astronaut = Image.fromarray(data.astronaut())
    chelsea = Image.fromarray(data.chelsea())
    return {
        "astronaut.jpg": encode(astronaut),  # 512x512
        "chelsea.jpg": encode(chelsea),  # 451x300
        "coffee.jpg": encode(Image.fromarray(data.coffee())),  # 600x400
        "rocket.jpg": encode(Image.fromarray(data.rocket())),  # 427x640, portrait
        "camera-grey.jpg": encode(Image.fromarray(data.camera()).convert("L")),  # 512x512, one channel
        "astronaut-1500.jpg": encode(astronaut.resize((1500, 1500), Image.Resampling.LANCZOS)),
        "chelsea-small.jpg": encode(chelsea.resize((135, 90), Image.Resampling.LANCZOS)),  # below 160 px
        "hubble.png": encode(Image.fromarray(data.hubble_deep_field()), "PNG"),  # 872x1000
    }


def folder_photos(folder: Path) -> dict[str, bytes]:
    """The photos (JPEG, PNG, WebP) directly in `folder`, by name."""
    photos = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
              if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and p.is_file()}
    if not photos:
        raise ValueError(f"{folder}: no JPEG, PNG or WebP photos in it")
    return photos


def cosine(a: Any, b: Any) -> float:
    """Cosine of two vectors."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def stats(samples: list[float]) -> dict[str, float]:
    """Median, p90, min and max of timings in milliseconds."""
    values = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "min": float(values.min()),
            "max": float(values.max()), "runs": int(values.size)}


def run(release: Path, photos: dict[str, bytes], rounds: int = 20, warmup: int = 3,
        out: Path | None = DEFAULT_OUT) -> dict[str, Any]:
    """Time `rounds` encodes of every photo in the browser and in Python (interleaved); write the report."""
    from models.preprocess import load_image, preprocess
    from models.release import Release
    from server.bench.browser import SearchPage, chromium
    from server.bench.driver import Server

    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    with tempfile.TemporaryDirectory(prefix="concord-web-bench-") as scratch, \
            Server(release, Path(scratch) / "data", Path(scratch) / "server.log", threads=1) as server, \
            chromium() as browser, SearchPage(browser, server.url) as page:
        if not page.open():
            raise RuntimeError(f"the page did not start: {page.state('startError')}")
        encoder = page.state("encoder")
        if encoder is None:
            raise RuntimeError(f"the browser cannot run the model: {page.state('fallbackReason')}")
        python = Release.load(release).encoder(encoder["modelId"], encoder["variant"], threads=1)
        rows: list[dict[str, Any]] = []
        for name, photo in photos.items():
            for _ in range(warmup):
                page.time_encodes(photo, 1)
                python.encode_bytes([photo])
            browser_model: list[float] = []
            browser_total: list[float] = []
            python_model: list[float] = []
            python_total: list[float] = []
            vector = None
            for _ in range(rounds):
                encoded = page.time_encodes(photo, 1)
                browser_model.append(encoded["runs"][0]["encodeMs"])
                browser_total.append(encoded["runs"][0]["totalMs"])
                vector = encoded["vector"]
                start = time.perf_counter()
                array = preprocess(load_image(photo), python.preprocess)[None]
                ran = time.perf_counter()
                expected = python.encode_arrays(array)[0]
                done = time.perf_counter()
                python_model.append((done - ran) * 1e3)
                python_total.append((done - start) * 1e3)
            image = load_image(photo)
            samples = {"browser_ms": browser_model, "browser_total_ms": browser_total, "python_ms": python_model,
                       "python_total_ms": python_total}
            rows.append({"photo": name, "size": f"{image.width}x{image.height}", "mode": _mode(photo),
                         "cosine": cosine(vector, expected),
                         "max_abs_diff": float(np.abs(np.asarray(vector, dtype=np.float32) - expected).max()),
                         **{k: stats(v) for k, v in samples.items()},
                         "samples_ms": samples})
        pooled = {key: stats([t for row in rows for t in row["samples_ms"][key]]) for key in TIMINGS}
        result = {**report.header(), "release": report.shown_path(release), "model": encoder,
                  "rounds": rounds, "warmup": warmup, "photos": rows, "overall": pooled,
                  "cosine_min": min(r["cosine"] for r in rows), "browser": browser.version}
    if out is not None:
        result["written"] = [str(p) for p in report.write(out, STEM, result, markdown(result))]
    return result


def _mode(photo: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(photo)) as image:
        return f"{image.format} {image.mode}"


def _row(row: dict[str, Any]) -> list[str]:
    """One photo's line of the markdown table."""
    columns = ("browser_ms", "python_ms", "browser_total_ms", "python_total_ms")
    medians = [f"{row[key]['median']:.1f}" for key in columns]
    return [row["photo"], row["size"], row["mode"], *medians, f"{row['cosine']:.6f}"]


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: per photo, then overall."""
    model = result["model"]
    median = {key: value["median"] for key, value in result["overall"].items()}
    runs = result["overall"]["browser_ms"]["runs"]
    lines = [
        "# In-browser encoding: the search page against onnxruntime in Python",
        "",
        f"{model['modelId']} {model['variant']} on onnxruntime-web {model['ort']} (WebAssembly, "
        f"{model['threads']} thread{'s' if model['threads'] != 1 else ''}) in headless Chromium {result['browser']}, "
        f"beside onnxruntime in Python (1 thread) on the same file; {result['rounds']} interleaved rounds per photo "
        f"after {result['warmup']} warm-up runs. `model` is the ONNX run alone; `photo to vector` adds decoding and "
        f"preprocessing.",
        "",
        report.table(["photo", "size", "file", "browser model ms", "Python model ms", "browser photo to vector ms",
                      "Python photo to vector ms", "cosine"], [_row(r) for r in result["photos"]]).rstrip(),
        "",
        f"- median of all {runs} encodes: browser model {median['browser_ms']:.1f} ms, Python int8 model "
        f"{median['python_ms']:.1f} ms ({median['browser_ms'] / median['python_ms']:.1f}x); photo to vector "
        f"{median['browser_total_ms']:.1f} ms vs {median['python_total_ms']:.1f} ms",
        f"- lowest cosine between the browser's and Python's embedding: {result['cosine_min']:.6f}; largest "
        f"difference of one component: {max(r['max_abs_diff'] for r in result['photos']):.2e}",
        "",
        report.context_markdown(result),
    ]
    return "\n".join(lines) + "\n"


def main(release: Path | None, photos: Path | None, rounds: int, warmup: int, out: Path) -> None:
    """`concord web-bench`: run, print the table and the files written (ValueError etc. for the CLI to say)."""
    from models.release import resolve_release

    result = run(resolve_release(release), folder_photos(photos) if photos else parity_photos(), rounds, warmup, out)
    print(markdown(result).rstrip())
    for path in result.get("written", []):
        print(f"wrote {path}")
