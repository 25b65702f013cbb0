"""Server settings from the environment and the command line; the API key check; photo sniffing by bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.release import SHIPPED_RELEASE
from server.security import AuthError, check_key, sniff_image
from server.settings import Settings, SettingsError
from tests.server_helpers import bomb_png, make_photo


def test_defaults_serve_the_shipped_release_on_loopback() -> None:
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.release == SHIPPED_RELEASE and SHIPPED_RELEASE.parts[-2:] == ("models", "release")
    assert settings.data_dir == Path("concord-data")
    assert settings.api_key is None and settings.auth_reads is False and settings.keep_bytes is True


def test_environment_then_command_line() -> None:
    env = {"CONCORD_RELEASE": "/r", "CONCORD_DATA_DIR": "/d", "CONCORD_PORT": "9001", "CONCORD_AUTH_READS": "yes",
           "CONCORD_API_KEY": "k", "CONCORD_KEEP_BYTES": "0", "CONCORD_THREADS": "", "CONCORD_MODEL": "cloud-v1"}
    settings = Settings.from_env(env, port=9002, model=None)
    assert settings.release == Path("/r") and settings.data_dir == Path("/d")
    assert settings.port == 9002, "the command line wins over the environment"
    assert settings.model == "cloud-v1", "an option not given (None) keeps the environment's value"
    assert settings.auth_reads is True and settings.keep_bytes is False and settings.threads is None
    assert settings.faiss_threads == 1 and Settings.from_env({"CONCORD_FAISS_THREADS": "2"}).faiss_threads == 2


@pytest.mark.parametrize(("env", "fragment"), [
    ({"CONCORD_PORT": "eighty"}, "CONCORD_PORT: expected an integer"),
    ({"CONCORD_AUTH_READS": "maybe"}, "CONCORD_AUTH_READS: expected true/false"),
    ({"CONCORD_MAX_REQUEST_BYTES": "0"}, "CONCORD_MAX_REQUEST_BYTES: must be a positive integer"),
    ({"CONCORD_FAISS_THREADS": "0"}, "CONCORD_FAISS_THREADS: must be a positive integer"),
    ({"CONCORD_WORKERS": "0"}, "CONCORD_WORKERS: must be a positive integer"),
    ({"CONCORD_WORKERS": "2", "CONCORD_GALLERY": "milvus-lite:./g.db"}, "CONCORD_WORKERS: Milvus Lite keeps its file"),
])
def test_bad_settings_name_their_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_a_blank_key_is_refused_and_an_empty_variable_unsets_it() -> None:
    with pytest.raises(SettingsError, match="CONCORD_API_KEY: must not be blank"):
        Settings(api_key="  ")
    assert Settings.from_env({"CONCORD_API_KEY": ""}).api_key is None


def test_api_key_check() -> None:
    check_key(None, None)  # no key configured: open
    check_key("secret", "secret")
    with pytest.raises(AuthError) as missing:
        check_key("secret", None)
    assert missing.value.status == 401
    with pytest.raises(AuthError) as wrong:
        check_key("secret", "secreT")
    assert wrong.value.status == 403


def test_photos_are_judged_by_their_bytes() -> None:
    assert sniff_image(make_photo(1)) == "image/jpeg"
    assert sniff_image(make_photo(1, fmt="PNG")) == "image/png"
    assert sniff_image(make_photo(1, fmt="WEBP")) == "image/webp"
    assert sniff_image(make_photo(1, fmt="GIF")) == "image/gif"
    assert sniff_image(make_photo(1, fmt="BMP")) == "image/bmp"
    assert sniff_image(make_photo(1, fmt="TIFF")) == "image/tiff"
    assert sniff_image(bomb_png()) == "image/png"
    assert sniff_image(b"<html>not a photo</html>") is None
    assert sniff_image(b"") is None


def test_serve_refuses_a_store_made_for_another_dim_before_loading_anything(
        tiny_release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from models.cli import main
    from models.manifest import Manifest
    from server.store import GalleryStore, recorded_dim

    dim = Manifest.load(tiny_release).model("cloud-v1").dim
    GalleryStore(tmp_path / "data" / "gallery", dim=dim + 1).close()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started on a store of another dim")

    monkeypatch.setattr(uvicorn, "run", never)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--release", str(tiny_release), "--data-dir", str(tmp_path / "data")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"holds {dim + 1}-dim vectors" in err and f"embeds into {dim} dims" in err and "--data-dir" in err
    assert recorded_dim(tmp_path / "data" / "gallery") == dim + 1  # the store is left as it was
    assert recorded_dim(tmp_path / "empty") is None


def test_the_service_runs_faiss_on_its_setting(tiny_release: Path, tmp_path: Path) -> None:
    import faiss

    from server.service import Service

    before = faiss.omp_get_max_threads()
    try:
        for count in (2, 1):
            settings = Settings.from_env({}, release=tiny_release, data_dir=tmp_path, faiss_threads=count)
            Service.open(settings).close()
            assert faiss.omp_get_max_threads() == count
    finally:
        faiss.omp_set_num_threads(before)


def test_a_gallery_keeps_to_one_space(tiny_release: Path, tmp_path: Path) -> None:
    """A gallery records the space of its vectors; one of another space (or an older release's, which recorded
    none) is refused in one line before anything loads and again when it opens, and is left as it was."""
    from models.manifest import Manifest
    from server.opening import check_store_fits
    from server.service import Service
    from server.settings import ACTIVE_MODEL_KEY, LEGACY_SPACE, SPACE_KEY
    from server.store import GalleryStore

    entry = Manifest.load(tiny_release).newest("cloud")
    assert entry.space != LEGACY_SPACE
    fresh = Settings.from_env({}, release=tiny_release, data_dir=tmp_path / "fresh")
    check_store_fits(fresh)
    Service.open(fresh).close()
    with GalleryStore(tmp_path / "fresh" / "gallery", dim=entry.dim) as store:
        assert store.get_setting(SPACE_KEY) == entry.space
    check_store_fits(fresh)  # the same release serves it again

    with GalleryStore(tmp_path / "old" / "gallery", dim=entry.dim) as store:  # made by an older release
        store.set_setting(ACTIVE_MODEL_KEY, "cloud-v1")
    old = Settings.from_env({}, release=tiny_release, data_dir=tmp_path / "old")
    for attempt in (check_store_fits, Service.open):
        with pytest.raises(ValueError) as err:
            attempt(old)
        message = str(err.value)
        assert "\n" not in message and f"holds vectors of space {LEGACY_SPACE!r}" in message
        assert f"embeds into space {entry.space!r}" in message and "--data-dir / CONCORD_DATA_DIR" in message
    with GalleryStore(tmp_path / "old" / "gallery", dim=entry.dim) as store:
        assert store.get_setting(SPACE_KEY) is None, "a refused gallery is left as it was"
