"""The search page in a real headless Chromium against a real `concord serve` with the shipped release and an
API key: upload through the page, search from it (the query encoded in the browser by onnxruntime-web), check
the results, "more like this", the match switch and the models view, and that the browser's embedding equals
the Python edge encoder's on the same photos and file. Writes screenshots of the page: to a temporary folder, or to
$CONCORD_SCREENSHOTS (`CONCORD_SCREENSHOTS=docs/screenshots` remakes the README's).

A missing Chromium or onnxruntime-web FAILS these tests (with how to get them: `make test` installs both); they
are never skipped.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.preprocess import load_image, preprocess
from models.release import SHIPPED_RELEASE, Release
from server.bench.browser import BrowserMissing, SearchPage, check_ready, chromium
from server.bench.web import cosine, parity_photos
from server.web.assets import ORT_DIR_VARIABLE
from tests.server_helpers import API_KEY, ServerProcess

PARITY = 0.99


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the page's screenshots go: $CONCORD_SCREENSHOTS when set (the README's), else a temporary folder."""
    folder = Path(os.environ.get("CONCORD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        check_ready()
    except BrowserMissing as err:
        pytest.fail(f"the browser tests cannot run: {err}", pytrace=False)
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("web-photos")
    paths = {}
    for name, data in parity_photos().items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shipped release, cloud-v2 indexing, the API key required for reads too (every page call needs it)."""
    process = ServerProcess(SHIPPED_RELEASE, tmp_path_factory.mktemp("web") / "data", model="cloud-v2")
    process.argv.append("--auth-reads")
    process.start(timeout=300)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def python_encoder() -> Any:
    return Release.load(SHIPPED_RELEASE).encoder("edge-v3", "device-int8", threads=1)


def _names(hits: list[dict[str, Any]]) -> list[str]:
    return [h["metadata"].get("filename") for h in hits]


def test_upload_search_and_parity_through_the_page(browser: Any, server: ServerProcess, photos: dict[str, Path],
                                                   screenshots: Path, python_encoder: Any) -> None:
    with SearchPage(browser, server.url, API_KEY) as page:
        assert page.open(), page.state("startError")
        assert page.key_asked == 1, "the page should ask for the key at its first call (reads need it here)"
        assert page.state("encoder")["modelId"] == "edge-v3" and page.state("encoder")["variant"] == "device-int8"
        assert page.state("fallbackReason") is None
        assert "Encoding in this browser" in page.page.get_by_test_id("encoder-status").inner_text()

        # upload: the progress bar fills, the library shows every photo, the server holds them
        summary = page.upload(list(photos.values()))
        assert summary == f"{len(photos)} photos: {len(photos)} added, 0 already in the library.", summary
        assert page.page.get_by_test_id("upload-progress").evaluate("(bar) => bar.value") == 1
        page.wait_images("library")
        assert page.page.get_by_test_id("library").get_by_test_id("hit").count() == len(photos)
        assert f"{len(photos)} photos in the library" in page.page.get_by_test_id("library-count").inner_text()
        page.screenshot(screenshots / "upload.png")
        stats = httpx.get(f"{server.url}/v1/stats", headers={"X-API-Key": API_KEY}).json()
        assert stats["photos"] == len(photos) and stats["vectors"] == {"cloud-v2": len(photos)}
        again = page.upload([photos["chelsea.jpg"]])
        assert again == "1 photo: 0 added, 1 already in the library.", again

        # search every photo from the page: encoded in the browser, equal to Python's encoder on the same file
        cosines = {}
        for name, path in photos.items():
            last = page.search(path, match="duplicate")
            assert last["via"] == "browser", last
            assert last["modelId"] == "edge-v3" and last["variant"] == "device-int8"
            expected = python_encoder.encode_bytes([path.read_bytes()])[0]
            cosines[name] = cosine(last["vector"], expected)
            assert cosines[name] >= PARITY, f"{name}: browser vs Python cosine {cosines[name]:.5f}"
            assert abs(float(np.linalg.norm(last["vector"])) - 1.0) < 1e-3
            answer = last["answer"]
            assert answer["query_model"] == "edge-v3" and answer["match"] == "duplicate"
            assert answer["searched_models"] == ["cloud-v2"]
            assert name in _names(answer["hits"])[:2], f"{name}: duplicate match found {_names(answer['hits'])[:3]}"
            assert last["encodeMs"] > 0
        print("browser vs Python cosines:", {k: round(v, 6) for k, v in cosines.items()})

        # the match switch repeats the search; the cards show the score and the model of each gallery vector
        last = page.search(photos["chelsea.jpg"], match="duplicate")
        last = page.set_match("similar")
        assert last is not None and last["answer"]["match"] == "similar" and last["via"] == "browser"
        hits = last["answer"]["hits"]
        assert len(hits) == len(photos) and all(h["model_id"] == "cloud-v2" for h in hits)
        cards = page.page.get_by_test_id("results").get_by_test_id("hit")
        assert cards.count() == len(hits)
        assert cards.first.get_by_test_id("score").inner_text() == f"score {hits[0]['score']:.3f}"
        assert cards.first.get_by_test_id("hit-model").inner_text() == "vector by cloud-v2"
        assert "encoded it in this browser in" in page.page.get_by_test_id("encode-time").inner_text()
        page.wait_images("results")
        page.screenshot(screenshots / "search.png")

        # more like this: searched with the stored photo's own vector, itself left out
        first = hits[0]["id"]
        similar = page.more_like_this(0)
        assert similar["via"] == "similar" and similar["photoId"] == first
        assert similar["answer"]["hits"] and first not in [h["id"] for h in similar["answer"]["hits"]]
        assert similar["answer"]["query_model"] == "cloud-v2"

        # the models, their lineage and the active one
        page.tab("models")
        rows = page.page.get_by_test_id("models").locator("tbody tr")
        assert rows.count() == len(Release.load(SHIPPED_RELEASE).manifest.models)
        table = page.page.get_by_test_id("models").inner_text()
        assert "active: indexes new photos" in table and "this page encodes with it" in table
        assert "cloud-v3, edge-v2" in table  # the lineage of edge-v3, the model the page runs
        page.screenshot(screenshots / "models.png")
        assert page.key_asked == 1, "the key is asked for once and kept"
        assert page.errors == []


def test_browser_preprocessing_is_pillows_bit_for_bit(browser: Any, server: ServerProcess,
                                                       photos: dict[str, Path], python_encoder: Any) -> None:
    with SearchPage(browser, server.url, API_KEY) as page:
        assert page.open()
        for name, path in photos.items():
            image = load_image(path.read_bytes())
            rgb = base64.b64encode(np.asarray(image, dtype=np.uint8).tobytes()).decode("ascii")
            made = page.page.evaluate("([b, w, h]) => window.concord.preprocessRGB(b, w, h)",
                                      [rgb, image.width, image.height])
            expected = preprocess(image, python_encoder.preprocess)
            browser_input = np.asarray(made, dtype=np.float32).reshape(expected.shape)
            assert np.array_equal(browser_input, expected), f"{name}: max diff {np.abs(browser_input - expected).max()}"


def test_page_falls_back_to_server_search_without_onnxruntime_web(browser: Any, photos: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """No onnxruntime-web beside the server, and the key needed for writes only: the page says so and why, searches
    through POST /v1/search/photo, and asks for the key at the first upload."""
    process = ServerProcess(SHIPPED_RELEASE, tmp_path / "data", model="cloud-v2")
    process.env[ORT_DIR_VARIABLE] = str(tmp_path / "no-node-modules")
    process.start(timeout=300)
    try:
        _check_fallback(browser, process, photos)
    finally:
        process.stop()


def _check_fallback(browser: Any, process: ServerProcess, photos: dict[str, Path]) -> None:
    with SearchPage(browser, process.url, API_KEY) as page:
        assert page.open()
        assert page.key_asked == 0
        assert page.state("encoder") is None
        notice = page.page.get_by_test_id("notice").inner_text()
        assert "cannot run the model" in notice and "npm ci" in notice and "/v1/search/photo" in notice
        # the first upload needs the key: a wrong one is refused (403) and the page asks again
        page.tab("library")
        chosen = [str(photos[name]) for name in ("coffee.jpg", "rocket.jpg")]
        page.page.get_by_test_id("library-input").set_input_files(chosen)
        dialog = page.page.get_by_test_id("key-dialog")
        dialog.wait_for(state="visible")
        page.page.get_by_test_id("key-input").fill("wrong-key")
        page.page.get_by_test_id("key-submit").click()
        page.page.wait_for_function("() => document.getElementById('key-dialog').open")
        assert "refused" in dialog.inner_text()
        page.give_key()
        page.wait("window.concord.uploads > 0")
        assert page.page.get_by_test_id("upload-text").inner_text().startswith("2 photos: 2 added")
        last = page.search(photos["coffee.jpg"], match="duplicate")
        assert last["via"] == "server" and last["modelId"] == "cloud-v2"
        assert _names(last["answer"]["hits"])[0] == "coffee.jpg"
        assert "The server encoded it with cloud-v2" in page.page.get_by_test_id("query-info").inner_text()
        assert page.errors == []
