"""The layout the README shows is the tree: every file and folder it names exists, and every module of the four
parts is named there (a root module by its file name, a module of a subfolder in that folder's line)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("models", "training", "edge", "server")


def layout() -> tuple[dict[str, set[str]], dict[str, str]]:
    """From the README's layout block: the files named per part, and each named folder's description text."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Where things are", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    files: dict[str, set[str]] = {}
    folders: dict[str, str] = {}
    part, folder = "", ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        fields = re.split(r"\s{2,}", line.strip())
        if indent == 0:
            part, folder = fields[0].rstrip("/"), ""
            files.setdefault(part, set())
        elif indent == 2:
            folder = ""
            names = [f for f in fields if f.endswith((".py", "/"))]
            for name in names:
                if name.endswith("/"):
                    folder = f"{part}/{name.rstrip('/')}"
                    folders[folder] = " ".join(fields[len(names):])
                else:
                    files[part].add(name)
        elif folder:
            folders[folder] += " " + line.strip()
    return files, folders


def test_every_file_and_folder_the_readme_names_exists() -> None:
    files, folders = layout()
    assert set(PARTS) <= set(files), "the layout shows every part"
    for part, names in files.items():
        for name in names:
            assert (ROOT / part / name).is_file(), f"README names {part}/{name}, which is not in the tree"
    for folder in folders:
        assert (ROOT / folder).is_dir(), f"README names {folder}/, which is not in the tree"


def test_every_module_is_in_the_readme_layout() -> None:
    files, folders = layout()
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            if path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(ROOT / part)
            if len(relative.parts) == 1:
                assert path.name in files[part], f"{part}/{relative} is missing from the README layout"
            else:
                folder = f"{part}/{relative.parts[0]}"
                assert folder in folders, f"{folder}/ is missing from the README layout"
                assert re.search(rf"\b{re.escape(path.stem)}\b", folders[folder]), \
                    f"{part}/{relative} is not named in the README layout's line for {folder}/"
    for path in sorted((ROOT / "server" / "web" / "static").iterdir()):
        assert path.name in folders["server/web"], f"server/web/static/{path.name} is missing from the layout"
