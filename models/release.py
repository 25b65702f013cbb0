"""The release store: a folder of ONNX files and the manifest that names them, verified before use.

`Release.load` validates the manifest and (by default) the sha256 of every file it names, so a missing,
truncated or tampered file is refused at start, by model id and file name. `Release.encoder` hashes the
bytes it actually loads as well, so a file swapped after start is refused too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

from models.manifest import Manifest, ModelEntry, ModelFile
from models.runtime import EncoderError, OnnxEncoder

CHUNK = 1 << 20
SHIPPED_RELEASE = Path(__file__).resolve().parent / "release"
"""The release shipped inside the package: what every command uses when told nothing else."""


def resolve_release(path: str | Path | None = None) -> Path:
    """The release folder: the argument, else $CONCORD_RELEASE, else the shipped `models/release`."""
    return Path(path or os.environ.get("CONCORD_RELEASE") or SHIPPED_RELEASE)


CARRIED_IDENTITY = ("role", "space", "dim", "version", "parents", "preprocess", "arch", "input", "output")
"""What a model carried over from a shipped release must share with the new release's entry of it."""


class ReleaseError(ValueError):
    """A release whose files are missing, outside its folder or differ from the manifest's sha256."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Release:
    """A loaded release: its manifest, its folder and cached encoders of its files."""

    def __init__(self, folder: str | Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self._encoders: dict[tuple[str, str, int | None], OnnxEncoder] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Release:
        """Read `folder/manifest.json` (ManifestError if invalid) and, with `verify`, check every file's sha256."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ReleaseError(f"{folder}: no release folder here")
        release = cls(folder, Manifest.load(folder))
        for entry in release.manifest.models.values():
            for variant, model_file in entry.files().items():
                path = release._resolve(entry.id, variant, model_file)
                if verify:
                    release._verify(entry.id, variant, model_file, path)
        return release

    def _resolve(self, model_id: str, variant: str, model_file: ModelFile) -> Path:
        name = Path(model_file.file)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ReleaseError(f"model {model_id!r} {variant} file {model_file.file!r}: must be a path inside "
                               f"the release folder")
        return self.folder / name

    def _verify(self, model_id: str, variant: str, model_file: ModelFile, path: Path) -> None:
        if not path.is_file():
            raise ReleaseError(f"model {model_id!r} {variant} file {model_file.file!r}: missing from {self.folder}")
        actual = sha256_file(path)
        if actual != model_file.sha256:
            raise ReleaseError(f"model {model_id!r} {variant} file {model_file.file!r}: sha256 {actual} differs "
                               f"from the manifest's {model_file.sha256}; the file was changed or damaged")

    def file(self, model_id: str, variant: str = "server") -> ModelFile:
        """The manifest's record of one file (KeyError for an unknown model, ReleaseError for a variant)."""
        files = self.manifest.model(model_id).files()
        if variant not in files:
            raise ReleaseError(f"model {model_id!r} has no {variant!r} file; it has {sorted(files)}")
        return files[variant]

    def path(self, model_id: str, variant: str = "server") -> Path:
        """Where the file of `model_id`'s `variant` lies ('server' is the dynamic-batch fp32 file)."""
        return self._resolve(model_id, variant, self.file(model_id, variant))

    def encoder(self, model_id: str, variant: str = "server", threads: int | None = None) -> OnnxEncoder:
        """The encoder of one file, loaded once (its bytes verified against the manifest) and cached."""
        key = (model_id, variant, threads)
        with self._lock:
            if key not in self._encoders:
                model_file = self.file(model_id, variant)
                path = self._resolve(model_id, variant, model_file)
                try:
                    self._encoders[key] = OnnxEncoder(path, self.manifest.model(model_id), threads,
                                                      batch_size=16, sha256=model_file.sha256)
                except EncoderError as err:
                    raise ReleaseError(f"{variant} file: {err}") from None
            return self._encoders[key]

    def ship(self, out: str | Path, keep: Mapping[str, str], carry: Release | None = None,
             renew: Collection[str] = ()) -> Release:
        """Copy a slimmer release to `out`: per model only the `keep[model_id]` variant, as its primary file.

        The shipped edge models are their int8 device files: the server never runs them, devices do. A model that
        the already shipped release `carry` holds too ships as it is there (its files, card and scorers; only the
        figures come from this release), so the files that made users' vectors never change; except the edge
        models named in `renew` (e.g. re-quantised): a query model's vectors are never stored, a cloud model's are.
        """
        for model_id in renew:
            if self.manifest.model(model_id).role != "edge":
                raise ReleaseError(f"{model_id}: only an edge model can be renewed; a cloud model's files made the "
                                   f"vectors users' galleries hold")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        models = {}
        for model_id, entry in self.manifest.models.items():
            if carry is not None and model_id in carry.manifest.models and model_id not in renew:
                models[model_id] = self._carried(carry, model_id, out)
                continue
            variant = keep.get(model_id, "server")
            chosen = self.file(model_id, variant)
            shutil.copyfile(self.path(model_id, variant), out / Path(chosen.file).name)
            kept = dataclasses.replace(chosen, file=Path(chosen.file).name)
            variants = {} if variant == "server" else {variant: kept}
            models[model_id] = dataclasses.replace(entry, file=kept.file, sha256=kept.sha256, variants=variants)
        dataclasses.replace(self.manifest, models=models).save(out / "manifest.json")
        return Release.load(out)

    def _carried(self, carry: Release, model_id: str, out: Path) -> ModelEntry:
        """`carry`'s entry of `model_id` with its files copied to `out`, after checking that it is the model this
        release describes (same identity, lineage, preprocessing and space) and given this release's figures."""
        old, new = carry.manifest.model(model_id), self.manifest.model(model_id)
        differ = [key for key in CARRIED_IDENTITY if getattr(old, key) != getattr(new, key)]
        if carry.manifest.spaces.get(old.space) != self.manifest.spaces.get(new.space):
            differ.append("space definition")
        if differ:
            raise ReleaseError(f"{model_id}: the shipped model and the new release's differ in {differ}, so it cannot "
                               f"be carried over as it is")
        files = {Path(f.file).name: variant for variant, f in old.files().items()}  # a slim entry names one twice
        for name, variant in files.items():
            shutil.copyfile(carry.path(model_id, variant), out / name)
        variants = {name: dataclasses.replace(f, file=Path(f.file).name) for name, f in old.variants.items()}
        return dataclasses.replace(old, file=Path(old.file).name, variants=variants, metrics=new.metrics)

    def __repr__(self) -> str:
        return f"Release({str(self.folder)!r}, models={sorted(self.manifest.models)})"
