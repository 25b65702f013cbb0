"""`concord demo` on the tiny release: indexes, searches from the device, upgrades without re-encoding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.bench.demo import DemoConfig, DemoError, folder_photos, run_demo
from server.cli import app
from tests.server_helpers import make_photo


@pytest.mark.parametrize(("release_fixture", "match"), [("tiny_release", "similar"),
                                                       ("fingerprinted_release", "duplicate")])
def test_demo_runs_end_to_end(release_fixture: str, match: str, tmp_path: Path, request: pytest.FixtureRequest
                              ) -> None:
    """The query is a copy of a gallery photo: searched in duplicate match when the space has a fingerprint."""
    release: Path = request.getfixturevalue(release_fixture)
    result = CliRunner().invoke(app, ["demo", "--release", str(release), "--data-dir", str(tmp_path / "data"),
                                      "--threads", "1"])
    out = result.output
    assert result.exit_code == 0, out
    assert out.count(f"in {match} match") == 3
    assert re.search(r"gate: PASSED", out)
    assert re.search(r"photos re-encoded: 0 \(the server's encoder count 8 -> 8\); 8 stored vectors kept", out)
    assert re.search(r"^\s+9\s+immunohistochemistry\s+cloud-v2$", out, re.M)  # indexed after the upgrade
    for search in ("edge-v1 before", "edge-v2 after", "edge-v1 after"):
        assert re.search(rf"^{search}\s+chelsea\s+yes$", out, re.M), search
    after = out.split("5. The same query")[1]
    assert re.search(r"^\s+1\s+chelsea\s+[0-9.]+\s+cloud-v1$", after, re.M)  # the old vector, found by the new app
    assert re.search(r"^\s+\d\s+\S+\s+[0-9.]+\s+cloud-v2$", after, re.M)  # beside the new model's vectors
    assert '{"cloud-v1": 8, "cloud-v2": 5}' in out
    assert (tmp_path / "data" / "gallery").is_dir()  # a named data folder is kept


def test_demo_upgrades_the_shipped_release_through_every_generation(tmp_path: Path) -> None:
    """The shipped release's three cloud models: v1 -> v2 -> v3, photos indexed by each, nothing re-encoded."""
    from models.release import SHIPPED_RELEASE

    result = CliRunner().invoke(app, ["demo", "--release", str(SHIPPED_RELEASE), "--threads", "1"])
    out = result.output
    assert result.exit_code == 0, out
    assert "3. Upgrade the server: cloud-v1 -> cloud-v2" in out and "5. Upgrade the server: cloud-v2 -> cloud-v3" in out
    assert out.count("gate: PASSED") == 2 and "FAIL" not in out
    assert re.search(r"photos re-encoded: 0 \(the server's encoder count 10 -> 10\); 10 stored vectors kept", out)
    assert "searched gallery vectors of cloud-v1, cloud-v2, cloud-v3" in out
    assert '{"cloud-v1": 8, "cloud-v2": 2, "cloud-v3": 3}' in out
    for search in ("edge-v1 before", "edge-v3 after", "edge-v1 after"):
        assert re.search(rf"^{search}\s+chelsea\s+yes$", out, re.M), search


def test_demo_photo_folder_and_data_folder_checks(tiny_release: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for seed in range(5):
        (photos / ("sub" if seed == 4 else "") / f"p{seed}.jpg").write_bytes(make_photo(seed))
    first, later = folder_photos(photos)
    assert [name for name, _ in first] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert [name for name, _ in later] == ["p3.jpg", "sub/p4.jpg"]
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.jpg").write_bytes(make_photo(9))
    with pytest.raises(DemoError, match="at least 3 photos"):
        folder_photos(few)
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(DemoConfig(release=tiny_release, data_dir=used, photos=photos))
