"""`concord encode` and `concord query`: embeddings made on the device; only the embedding goes to the server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.client import ApiError, ConcordClient, encode_photos
from models.manifest import Manifest
from tests.edge_helpers import run_cli, write_photos


@dataclass
class FakeServer:
    """A real HTTP server on 127.0.0.1 that records each request and answers what the test sets."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    answer: Any = None


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "raw": raw})
            body = json.dumps(state.answer).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def photos(sample_photos: dict[str, bytes], tmp_path: Path) -> list[Path]:
    return write_photos(sample_photos, tmp_path / "photos")


HITS = {"query_model": "edge-v2", "k": 5, "searched_models": ["cloud-v1", "cloud-v2"],
        "skipped_models": {"cloud-x": "model 'cloud-x' is in another space"},
        "hits": [{"id": 7, "score": 0.93, "model_id": "cloud-v1", "metadata": {"caption": "a cat"}},
                 {"id": 3, "score": 0.41, "model_id": "cloud-v2", "metadata": {}}]}


def test_query_sends_only_a_unit_embedding_made_on_the_device(
        tiny_release: Path, photos: list[Path], fake_server: FakeServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_server.answer = HITS
    code, out, err = run_cli(["query", str(photos[1]), "--server", fake_server.url, "--k", "5",
                              "--api-key", "s3cret", "--release", str(tiny_release)], capsys)
    assert code == 0, err
    assert len(fake_server.requests) == 1
    request = fake_server.requests[0]
    assert request["path"] == "/v1/search/embedding"
    assert request["headers"]["X-API-Key"] == "s3cret"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["raw"])
    assert set(body) == {"vector", "model_id", "k", "match"}  # no photo, no file name, nothing else
    assert body["model_id"] == "edge-v2" and body["k"] == 5 and body["match"] == "similar"
    vector = np.array(body["vector"], dtype=np.float64)
    dim = Manifest.load(tiny_release).model("edge-v2").dim
    assert vector.shape == (dim,) and np.all(np.isfinite(vector))
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    local = encode_photos(tiny_release, [photos[1]]).vectors[0]
    assert float(vector @ local) == pytest.approx(1.0, abs=1e-5)  # the device's own encoding of that photo
    photo_bytes = photos[1].read_bytes()
    assert len(request["raw"]) < len(photo_bytes) / 4 and photo_bytes[:64] not in request["raw"]
    assert "a cat" in out and "cloud-v1" in out and out.index(" 7 ") < out.index(" 3 ")
    assert "not searched: cloud-x (model 'cloud-x' is in another space)" in out


def test_search_client_returns_hits(fake_server: FakeServer) -> None:
    fake_server.answer = HITS
    with ConcordClient(fake_server.url + "/") as client:
        found = client.search_embedding(np.full(4, 0.5, dtype=np.float32), "edge-v1", k=2)
    assert [(h.id, h.model_id) for h in found.hits] == [(7, "cloud-v1"), (3, "cloud-v2")]
    assert found.hits[0].metadata == {"caption": "a cat"} and found.searched_models == ["cloud-v1", "cloud-v2"]
    assert "X-API-Key" not in fake_server.requests[0]["headers"]  # no key given, none sent


def test_query_passes_the_match_through(tiny_release: Path, photos: list[Path], fake_server: FakeServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake_server.answer = {**HITS, "match": "duplicate"}
    code, out, err = run_cli(["query", str(photos[0]), "--server", fake_server.url, "--match", "duplicate",
                              "--release", str(tiny_release), "--json"], capsys)
    assert code == 0, err
    assert json.loads(fake_server.requests[0]["raw"])["match"] == "duplicate"
    assert json.loads(out)["match"] == "duplicate"
    code, _, err = run_cli(["query", str(photos[0]), "--server", fake_server.url, "--match", "exact",
                            "--release", str(tiny_release)], capsys)
    assert code == 1 and "unknown match 'exact'; use one of similar, duplicate" in err
    assert len(fake_server.requests) == 1  # the unknown match never reached the server


def test_the_client_speaks_the_whole_api(fake_server: FakeServer) -> None:
    fake_server.answer = {"found": {"ab" * 32: 4}, "photos": []}
    with ConcordClient(fake_server.url, api_key="k") as client:
        assert client.lookup(["ab" * 32, "cd" * 32]) == {"ab" * 32: 4}
        client.add_photos([("trip/a.jpg", b"JPEG-bytes")], [{"path": "trip/a.jpg"}])
        client.upgrade("cloud-v2")
        client.stats()
    lookup, upload, upgrade, stats = fake_server.requests
    assert json.loads(lookup["raw"]) == {"hashes": ["ab" * 32, "cd" * 32]}
    assert upload["path"] == "/v1/photos" and b'filename="a.jpg"' in upload["raw"] and b"JPEG-bytes" in upload["raw"]
    assert b'[{"path": "trip/a.jpg"}]' in upload["raw"]
    assert json.loads(upgrade["raw"]) == {"model_id": "cloud-v2"} and upgrade["path"] == "/v1/models/upgrade"
    assert (stats["method"], stats["path"]) == ("GET", "/v1/stats")
    assert all(r["headers"]["X-API-Key"] == "k" for r in fake_server.requests)


def test_a_refusal_carries_the_status_and_the_servers_detail(fake_server: FakeServer) -> None:
    fake_server.status, fake_server.answer = 422, {"detail": "broken.jpg: not a photo"}
    with ConcordClient(fake_server.url) as client, pytest.raises(ApiError) as refused:
        client.add_photos([("broken.jpg", b"x")])
    assert refused.value.status == 422 and refused.value.detail == "broken.jpg: not a photo"
    assert str(refused.value) == f"POST {fake_server.url}/v1/photos: the server answered 422: broken.jpg: not a photo"


def test_the_indexer_finds_nothing_in_an_empty_folder(tmp_path: Path, fake_server: FakeServer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["index", str(tmp_path), "--server", fake_server.url, "--no-progress"], capsys)
    assert code == 0, err
    assert out.startswith("0 photos: 0 indexed, 0 already on the server, 0 duplicates, 0 failed")
    assert fake_server.requests == []
    code, _, err = run_cli(["index", str(tmp_path / "absent"), "--server", fake_server.url], capsys)
    assert code == 1 and "absent: no such folder" in err


def test_search_client_refuses_a_non_finite_vector(fake_server: FakeServer) -> None:
    with ConcordClient(fake_server.url) as client, pytest.raises(ApiError, match="finite"):
        client.search_embedding(np.array([0.5, np.nan], dtype=np.float32), "edge-v1")
    assert fake_server.requests == []


@pytest.mark.parametrize(("status", "answer", "shown"), [
    (401, {"detail": "invalid API key"}, "401: invalid API key"),
    (422, {"detail": [{"loc": ["body", "vector"], "msg": "expected 32 values"}]}, "body.vector: expected 32 values"),
    (409, {"error": "model edge-v9 is not in the gallery's space"}, "409: model edge-v9 is not"),
])
def test_query_prints_the_servers_message_on_4xx(tiny_release: Path, photos: list[Path], fake_server: FakeServer,
                                                 capsys: pytest.CaptureFixture[str], status: int, answer: Any,
                                                 shown: str) -> None:
    fake_server.status, fake_server.answer = status, answer
    code, _, err = run_cli(["query", str(photos[0]), "--server", fake_server.url,
                            "--release", str(tiny_release)], capsys)
    assert code == 1 and shown in err


def test_query_reports_an_unreachable_server(tiny_release: Path, photos: list[Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run_cli(["query", str(photos[0]), "--server", f"http://127.0.0.1:{port}",
                            "--release", str(tiny_release), "--timeout", "2"], capsys)
    assert code == 1 and f"cannot reach the server at http://127.0.0.1:{port}" in err


def test_query_refuses_a_missing_or_corrupt_photo(tiny_release: Path, tmp_path: Path, fake_server: FakeServer,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a photo")
    for photo, message in ((tmp_path / "absent.jpg", "absent.jpg: no such file"),
                           (corrupt, "corrupt.jpg: not a photo")):
        code, _, err = run_cli(["query", str(photo), "--server", fake_server.url,
                                "--release", str(tiny_release)], capsys)
        assert code == 1 and message in err
    assert fake_server.requests == []  # nothing was sent


def test_encode_prints_one_json_line_per_photo(tiny_release: Path, photos: list[Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["encode", str(photos[0]), str(photos[2]), "--release", str(tiny_release)], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["photo"] for line in lines] == [str(photos[0]), str(photos[2])]
    assert all(line["model_id"] == "edge-v2" and line["variant"] == "device-fp32" for line in lines)
    vectors = np.array([line["embedding"] for line in lines])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert abs(float(vectors[0] @ vectors[1])) < 0.999  # two different photos, two different embeddings


def test_encode_saves_npy_and_json(tiny_release: Path, photos: list[Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(p) for p in photos[:3]] + ["--release", str(tiny_release), "--model", "edge-v1"]
    assert run_cli(["encode", *args, "--out", str(tmp_path / "e.npy")], capsys)[0] == 0
    assert run_cli(["encode", *args, "--out", str(tmp_path / "e.json")], capsys)[0] == 0
    array = np.load(tmp_path / "e.npy")
    saved = json.loads((tmp_path / "e.json").read_text())
    assert array.shape == (3, 32) and array.dtype == np.float32
    assert saved["model_id"] == "edge-v1" and saved["dim"] == 32 and saved["photos"] == args[:3]
    np.testing.assert_allclose(np.array(saved["embeddings"]), array, atol=1e-6)
    code, _, err = run_cli(["encode", *args, "--out", str(tmp_path / "e.csv")], capsys)
    assert code == 1 and "--out must end in .npy or .json" in err


def test_encode_names_an_unknown_model(tiny_release: Path, photos: list[Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["encode", str(photos[0]), "--release", str(tiny_release), "--model", "edge-v9"],
                           capsys)
    assert code == 1 and "unknown model 'edge-v9'" in err
