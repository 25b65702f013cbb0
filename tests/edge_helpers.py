"""Helpers shared by the edge tests: a writable copy of the tiny release, photo files, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.cli import main


def copy_release(tiny_release: Path, tmp_path: Path) -> Path:
    """A copy of the session's tiny release that a test may modify."""
    return Path(shutil.copytree(tiny_release, tmp_path / "release"))


def write_photos(sample_photos: dict[str, bytes], folder: Path) -> list[Path]:
    """The sample photos as JPEG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sample_photos.items():
        path = folder / f"{name}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `concord ARGS...` in this process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out, err
