"""The search page's routes without a browser: the page and its assets, onnxruntime-web's files (and the message
when they are missing), the release's model files (sha256-verified, ETag) and the library listing."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.web import assets
from tests.server_helpers import API_KEY, WRITE, add_photos, in_process, make_photo, tiny_settings


@pytest.fixture()
def client(tiny_release: Path, tmp_path: Path) -> Iterator[TestClient]:
    with in_process(tiny_settings(tiny_release, tmp_path)) as http:
        yield http


def test_page_and_assets_are_served_by_the_server(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert 'src="/web/app.js"' in page.text and "http" not in page.text.split("<body>")[0]  # no CDN in the head
    for name in ("app.js", "api.js", "encoder.js", "preprocess.js", "probes.js"):
        script = client.get(f"/web/{name}")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "https://" not in script.text and "http://" not in script.text  # every asset from this server
    assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
    for bad in ("nothing.js", ".hidden", "..%2Fapp.py", "routes.py"):
        assert client.get(f"/web/{bad}").status_code == 404


def test_onnxruntime_web_files_when_installed(client: TestClient) -> None:
    found = assets.find_ort()
    if not found.available:
        pytest.fail(f"onnxruntime-web is not installed here: {assets.ORT_HINT}")
    config = client.get("/web/config.json").json()["ort"]
    assert config["available"] is True and config["version"] and config["missing"] == []
    assert config["wasm_paths"] == "/web/ort/" and config["hint"] is None
    wasm = client.get("/web/ort/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
    assert wasm.content[:4] == b"\0asm"
    assert client.get("/web/ort/ort.wasm.min.mjs").headers["content-type"].startswith("text/javascript")
    assert client.get("/web/ort/ort.webgpu.min.mjs").status_code == 404  # only the WebAssembly build is served
    assert client.get("/web/ort/package.json").status_code == 404


def test_missing_onnxruntime_web_says_how_to_get_it_and_the_api_keeps_working(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.ORT_DIR_VARIABLE, str(tmp_path / "nowhere"))
    config = client.get("/web/config.json").json()["ort"]
    assert config["available"] is False and "npm ci" in config["hint"]
    assert set(config["missing"]) == set(assets.ORT_FILES)
    missing = client.get("/web/ort/ort.wasm.min.mjs")
    assert missing.status_code == 404 and "npm ci" in missing.json()["detail"]
    assert client.get("/").status_code == 200  # the page still loads and tells the person
    assert client.get("/v1/models").status_code == 200
    assert add_photos(client, {"a.jpg": make_photo(1)})[0]["id"] >= 1


def test_model_files_are_listed_and_served_sha256_verified(client: TestClient, tiny_release: Path) -> None:
    listing = client.get("/v1/models/edge-v2/files").json()
    assert listing["model_id"] == "edge-v2" and listing["input"] == "image" and listing["output"] == "embedding"
    assert listing["preprocess"] == {"resize": 32, "crop": 32, "interpolation": "bicubic", "value_range": [0.0, 1.0]}
    files = {f["variant"]: f for f in listing["files"]}
    assert set(files) == {"server", "device-fp32"} and files["device-fp32"]["batch"] == 1
    answer = client.get(files["device-fp32"]["url"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(answer.content).hexdigest() == files["device-fp32"]["sha256"]
    assert answer.content == (tiny_release / files["device-fp32"]["file"]).read_bytes()
    assert len(answer.content) == files["device-fp32"]["bytes"]
    assert answer.headers["etag"] == f'"{files["device-fp32"]["sha256"]}"'
    again = client.get(files["device-fp32"]["url"], headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    unknown = client.get("/v1/models/edge-v9/files/server")
    assert unknown.status_code == 404 and "edge-v2" in unknown.json()["detail"]
    variant = client.get("/v1/models/edge-v2/files/device-int8")
    assert variant.status_code == 404 and "device-fp32" in variant.json()["detail"]


def test_a_changed_model_file_is_never_served(tiny_release: Path, tmp_path: Path) -> None:
    release = tmp_path / "release"
    shutil.copytree(tiny_release, release)
    with in_process(tiny_settings(release, tmp_path)) as client:
        target = release / "edge-v2.device.onnx"
        target.write_bytes(target.read_bytes() + b"tampered")
        answer = client.get("/v1/models/edge-v2/files/device-fp32")
        assert answer.status_code == 500 and "refusing to serve it" in answer.json()["detail"]
        assert b"tampered" not in answer.content


def test_reads_of_model_files_and_the_library_need_the_key_when_reads_do(tiny_release: Path, tmp_path: Path) -> None:
    with in_process(tiny_settings(tiny_release, tmp_path, auth_reads=True)) as client:
        for path in ("/v1/models/edge-v2/files", "/v1/models/edge-v2/files/server", "/v1/library"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 403
            assert client.get(path, headers={"X-API-Key": API_KEY}).status_code == 200
        assert client.get("/").status_code == 200 and client.get("/web/config.json").status_code == 200


def test_library_pages_newest_first(client: TestClient) -> None:
    assert client.get("/v1/library").json() == {"total": 0, "offset": 0, "limit": 48, "photos": []}
    ids = [p["id"] for p in add_photos(client, {f"p{i}.jpg": make_photo(i) for i in range(5)},
                                       metadata=[{"filename": f"p{i}.jpg"} for i in range(5)])]
    first = client.get("/v1/library", params={"limit": 2}).json()
    assert first["total"] == 5 and [p["id"] for p in first["photos"]] == ids[::-1][:2]
    assert first["photos"][0]["metadata"] == {"filename": "p4.jpg"} and first["photos"][0]["model_id"] == "cloud-v1"
    rest = client.get("/v1/library", params={"offset": 2, "limit": 10}).json()
    assert [p["id"] for p in rest["photos"]] == ids[::-1][2:]
    assert client.get("/v1/library", params={"limit": 0}).status_code == 422
    assert client.get("/v1/library", params={"offset": -1}).status_code == 422
    client.delete(f"/v1/photos/{ids[0]}", headers=WRITE)
    assert client.get("/v1/library").json()["total"] == 4
