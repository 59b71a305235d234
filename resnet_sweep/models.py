"""Plain and residual CNNs (He et al. 2015) built from a typed ModelConfig.

This module knows nothing of Hydra, MLflow or files: `build_model(cfg, input_shape, num_classes)` is a
plain function of its arguments. A plain net is the residual net of the same depth with its shortcuts
removed, so the two differ only in the shortcuts (the paper's comparison).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from resnet_sweep.architectures import ACTIVATION_NAMES, IMAGENET_DEPTHS



class ModelConfig(Protocol):
    """What a net is built from: config.ModelConfig has these fields (enums or their names), but models
    do not import config, so the dependency runs one way (config -> models)."""

    family: Any  # plain | resnet
    layout: Any  # cifar | imagenet | article
    depth: int
    activation: Any  # a key of ACTIVATIONS
    norm: Any  # batch | none
    shortcut: Any  # A | B
    preactivation: bool
    init: Any  # kaiming | xavier | normal | torch
    init_std: float
    stem: Any  # auto | small | large

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "architectures.ACTIVATION_NAMES and ACTIVATIONS must agree"
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)  # He et al. 2015, section 4.2: 6n+2 layers, n blocks a stage

# The `stem: auto` rule: inputs at least this many pixels on their shorter side get the ImageNet stem
# (7x7 stride 2 + max-pool); smaller ones (digits, MNIST, CIFAR) get a 3x3 stride-1 conv, as in the
# paper's CIFAR nets, since a 4x downsampling would leave a 28x28 image 7x7 before the first stage.
LARGE_STEM_MIN_SIDE = 64


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


class _Spec:
    """What every block needs from the config, resolved once (enums to callables)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.residual = _name(cfg.family) == "resnet"
        self.act: Callable[[], nn.Module] = ACTIVATIONS[_name(cfg.activation)]
        self.batch_norm = _name(cfg.norm) == "batch"
        self.shortcut = _name(cfg.shortcut)
        self.preact = cfg.preactivation
        # A conv followed by BatchNorm needs no bias (BN's shift replaces it); without BN it keeps one.
        self.bias = not self.batch_norm

    def norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.batch_norm else nn.Identity()


def _name(value: object) -> str:
    return getattr(value, "name", value)  # type: ignore[return-value]


class PadShortcut(nn.Module):
    """Option A: parameter-free identity, subsampled by the stride and zero-padded in channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def make_shortcut(cin: int, cout: int, stride: int, spec: _Spec) -> nn.Module:
    if cin == cout and stride == 1:
        return nn.Identity()
    if spec.shortcut == "A":
        return PadShortcut(cin, cout, stride)
    # Option B: a 1x1 projection only where the shape changes (He et al. 2015, eq. 2).
    return nn.Sequential(conv1x1(cin, cout, stride, spec.bias), spec.norm(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs. Post-activation (2015): act(F(x) + x). Pre-activation (2016): F(act(bn(x))) + x."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, spec: _Spec) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.preact, self.residual = spec.preact, spec.residual
        self.norm1 = spec.norm(cin if spec.preact else planes)
        self.conv1 = conv3x3(cin, planes, stride, spec.bias)
        self.act1 = spec.act()
        self.conv2 = conv3x3(planes, cout, 1, spec.bias)
        self.norm2 = spec.norm(planes if spec.preact else cout)
        self.act2 = spec.act()
        self.shortcut = make_shortcut(cin, cout, stride, spec) if spec.residual else None
        self.shape_preserving = stride == 1 and cin == cout  # a lesion may delete it (removable_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv1(self.act1(self.norm1(x)))
            out = self.conv2(self.act2(self.norm2(out)))
            return out + self.shortcut(x) if self.shortcut is not None else out
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, spec: _Spec) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.preact = spec.preact
        self.norm1 = spec.norm(cin if spec.preact else planes)
        self.conv1 = conv1x1(cin, planes, 1, spec.bias)
        self.act1 = spec.act()
        self.norm2 = spec.norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, spec.bias)
        self.act2 = spec.act()
        self.conv3 = conv1x1(planes, cout, 1, spec.bias)
        self.norm3 = spec.norm(planes if spec.preact else cout)
        self.act3 = spec.act()
        self.shortcut = make_shortcut(cin, cout, stride, spec) if spec.residual else None
        self.shape_preserving = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv1(self.act1(self.norm1(x)))
            out = self.conv2(self.act2(self.norm2(out)))
            out = self.conv3(self.act3(self.norm3(out)))
            return out + self.shortcut(x) if self.shortcut is not None else out
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act3(out)


class ArticleBlock(nn.Module):
    """The seed article's ResBlock: conv c->30 5x5, act, conv 30->c 3x3, act, then act(out + x).

    Kept exactly, including the second activation after the sum (idempotent for ReLU, not for sigmoid).
    """

    def __init__(self, channels: int, spec: _Spec, hidden: int = 30) -> None:
        super().__init__()
        self.residual = spec.residual
        self.conv1 = nn.Conv2d(channels, hidden, 5, padding=2, bias=spec.bias)
        self.norm1 = spec.norm(hidden)
        self.act1 = spec.act()
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=spec.bias)
        self.norm2 = spec.norm(channels)
        self.act2 = spec.act()
        self.act3 = spec.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        return self.act3(out + x if self.residual else out)


def _stem(cin: int, width: int, side: int, cfg: ModelConfig, spec: _Spec) -> nn.Sequential:
    stem = _name(cfg.stem)
    large = stem == "large" or (stem == "auto" and side >= LARGE_STEM_MIN_SIDE)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if large:
        layers["conv"] = nn.Conv2d(cin, width, kernel_size=7, stride=2, padding=3, bias=spec.bias)
    else:
        layers["conv"] = conv3x3(cin, width, 1, spec.bias)
    if not spec.preact:  # a pre-activation net normalises at the start of its first block instead
        layers["norm"] = spec.norm(width)
        layers["act"] = spec.act()
    if large:
        layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(layers)


def _stages(block: type[nn.Module], cin: int, widths: tuple[int, ...], blocks: list[int],
            spec: _Spec) -> tuple[OrderedDict[str, nn.Module], int]:
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (planes, n) in enumerate(zip(widths, blocks)):
        layer = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            layer.append(block(cin, planes, stride, spec))
            cin = planes * block.expansion  # type: ignore[attr-defined]
        stages[f"layer{i + 1}"] = nn.Sequential(*layer)
    return stages, cin


def _head(features: int, num_classes: int, spec: _Spec) -> OrderedDict[str, nn.Module]:
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.preact:  # He et al. 2016: the last block's sum is normalised and activated before pooling
        head["norm"] = spec.norm(features)
        head["act"] = spec.act()
    head["pool"] = nn.AdaptiveAvgPool2d(1)
    head["flatten"] = nn.Flatten()
    head["fc"] = nn.Linear(features, num_classes)
    return head


def _article(cin: int, side: int, num_classes: int, spec: _Spec) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = [(cin, 20, 5), (20, 40, 3), (40, 80, 3), (80, 160, 3)]
    for i, (c_in, c_out, k) in enumerate(channels, start=1):
        stage: OrderedDict[str, nn.Module] = OrderedDict()
        stage["conv"] = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=spec.bias)
        stage["norm"] = spec.norm(c_out)
        if i < 4:
            stage["block"] = ArticleBlock(c_out, spec)
        stage["act"] = spec.act()
        # The article pools 28 -> 14 -> 7 -> 3 -> 1. On smaller inputs (8x8 digits) a map already 1x1
        # is not pooled again, so the same net runs; on MNIST this rule changes nothing.
        if side > 1:
            stage["pool"] = nn.MaxPool2d(2, 2)
            side //= 2
        layers[f"stage{i}"] = nn.Sequential(stage)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(160 * side * side, num_classes)
    return nn.Sequential(layers)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """One init loop for every weighted layer; BatchNorm starts as the identity (scale 1, shift 0)."""
    scheme = _name(cfg.init)
    if scheme == "torch":  # PyTorch's own per-layer defaults, as the seed article uses
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming":
                if isinstance(m, nn.Linear):
                    continue  # as torchvision's ResNets: the classifier keeps PyTorch's default init
                # He et al. 2015b ("Delving deep into rectifiers"), fan_out as torchvision: keeps the
                # gradient's variance through the backward pass of ReLU nets.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_normal_(m.weight)  # Glorot & Bengio 2010
            else:  # "normal": N(0, std^2), the article's "0.01" weights that shrink the signal layer by layer
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int] | list[int],
                num_classes: int) -> nn.Sequential:
    """Build the net that `cfg` names for inputs of shape (C, H, W) and `num_classes` outputs."""
    cin, height, width = input_shape
    side = min(height, width)
    spec = _Spec(cfg)
    layout = _name(cfg.layout)
    if layout == "article":
        model = _article(cin, side, num_classes, spec)
    else:
        if layout == "cifar":
            block, widths, blocks = BasicBlock, CIFAR_WIDTHS, [(cfg.depth - 2) // 6] * 3
        else:
            kind, blocks = IMAGENET_DEPTHS[cfg.depth]
            block = BasicBlock if kind == "basic" else Bottleneck
            widths = IMAGENET_WIDTHS
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = _stem(cin, widths[0], side, cfg, spec)
        stages, features = _stages(block, widths[0], widths, blocks, spec)
        layers.update(stages)
        layers.update(_head(features, num_classes, spec))
        model = nn.Sequential(layers)
    init_weights(model, cfg)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one input, in evaluation mode, as PyTorch's FlopCounterMode counts them
    (a multiply-add is 2: convolutions and matrix products; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers in the order they were built, which is depth order (shortcuts after
    their block's convs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def removable_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks a lesion can delete (Veit et al. 2016): residual stages' blocks whose output
    has their input's shape (no stride, no width change), so the net without them still runs. The first
    block of a later stage changes the shape and stays: for a plain net there is no identity to put in its
    place, and ResNets keep it too so that both families lose the same blocks."""
    return [name for name, block in model.named_modules()
            if isinstance(block, (BasicBlock, Bottleneck)) and block.shape_preserving]


@contextmanager
def lesioned(model: nn.Module, names: list[str]) -> Iterator[nn.Module]:
    """The model with the named blocks deleted (each replaced by the identity, so a block's output is its
    input), restored on exit. For a ResNet block with a ReLU after the addition this is exactly the block
    with its residual branch skipped, relu(0 + x) = x, since its input is itself a ReLU's output; Veit et
    al. delete blocks the same way (y_i = y_{i-1})."""
    taken: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            taken.append((parent, child, getattr(parent, child)))
            setattr(parent, child, nn.Identity())
        yield model
    finally:
        for parent, child, block in reversed(taken):
            setattr(parent, child, block)
