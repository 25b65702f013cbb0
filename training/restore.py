"""Start the chain from the shipped models: put each released model's head weights into its checkpoint.

Training on two CPU cores is not bit-for-bit repeatable, so a retrained cloud-v2 is close to the shipped one
but not it. A later model must stay compatible with the vectors users' galleries hold, which the SHIPPED models
made: `restore_heads` reads every head weight from the release's ONNX files (fp32 as stored, fp16-stored weights
cast back, int8 weights dequantised) into the trained checkpoints, so the next model trains against them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from models.release import Release
from training.trainer import load_checkpoint, save_checkpoint

HEAD = "head."


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """Every named weight of an ONNX file as float32: plain initializers, fp16 ones behind a Cast, and int8
    ones behind a DequantizeLinear (per-tensor or per-channel), by the torch parameter name they came from."""
    graph = onnx.load(str(path)).graph
    raw = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = {name: value.astype(np.float32) for name, value in raw.items() if value.dtype == np.float32}
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in raw:
            weights[node.output[0]] = raw[node.input[0]].astype(np.float32)
        elif node.op_type == "DequantizeLinear" and node.input[0] in raw:
            weights[node.input[0].removesuffix("_quantized")] = _dequantise(node, raw)
    return weights


def _dequantise(node: onnx.NodeProto, raw: dict[str, np.ndarray]) -> np.ndarray:
    values = raw[node.input[0]].astype(np.float32)
    scale = raw[node.input[1]].astype(np.float32)
    zero = raw[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
    if scale.ndim == 1 and values.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def restore_heads(release_folder: Path, runs: Path, models: list[str] | None = None) -> dict[str, float]:
    """Overwrite the head of RUNS/<id>/checkpoint.pt with the released model's, for every model of the release
    (or `models`); returns per model the largest weight change, so a user sees how far the retrained one was."""
    release = Release.load(release_folder)
    moved = {}
    for model_id in models or sorted(release.manifest.models):
        path = runs / model_id / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: train {model_id} first (its config and classifier come from there)")
        checkpoint = load_checkpoint(path)
        weights = onnx_weights(release.path(model_id))
        state = dict(checkpoint.model)
        heads = [k for k in state if k.startswith(HEAD)]
        missing = [k for k in heads if k not in weights]
        if missing:
            raise ValueError(f"{model_id}: the release's file holds no {missing}")
        moved[model_id] = max(float((state[k] - torch.from_numpy(weights[k])).abs().max()) for k in heads)
        state.update({k: torch.from_numpy(weights[k]).reshape(state[k].shape).clone() for k in heads})
        save_checkpoint(path, dataclasses.replace(checkpoint, model=state))
    return moved
