"""Export torch modules to ONNX (`image` -> output), with the checks the release contract asks for."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def to_onnx(module: nn.Module, path: str | Path, resolution: int, batch: int | None = None,
            output: str = "embedding", opset: int = OPSET) -> Path:
    """Write `module` (put in eval mode here) as ONNX: input `image` [N, 3, R, R], N dynamic when batch is None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.rand(batch or 2, 3, resolution, resolution)
    dynamic = None if batch else {"image": {0: "batch"}, output: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=[output],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return path
