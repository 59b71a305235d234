"""The paper's and torchvision's numbers hold; every activation x norm x family trains a step."""

from __future__ import annotations

import itertools

import pytest
import torch

from resnet_sweep.config import Activation, Family, Layout, ModelConfig, Norm, Shortcut, Stem
from resnet_sweep.models import ACTIVATIONS, build_model, count_parameters, weighted_layers


def cifar(depth: int, family: str = "resnet", **kw) -> ModelConfig:
    return ModelConfig(family=Family[family], layout=Layout.cifar, depth=depth, **kw)


# He et al. 2015, Table 6 (and akamaster/pytorch_resnet_cifar10): CIFAR-10 nets, option A, 3x32x32 input.
@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts_match_the_paper(depth: int, millions: float) -> None:
    n = count_parameters(build_model(cifar(depth), (3, 32, 32), 10))
    assert float(f"{n / 1e6:.2g}") == millions


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_plain_twin_has_exactly_the_resnets_parameters_under_option_a(depth: int) -> None:
    resnet = count_parameters(build_model(cifar(depth, "resnet"), (3, 32, 32), 10))
    plain = count_parameters(build_model(cifar(depth, "plain"), (3, 32, 32), 10))
    assert plain == resnet


# torchvision.models.resnet18/34/50(num_classes=1000).
@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_imagenet_resnet_parameter_counts_match_torchvision(depth: int, expected: int) -> None:
    cfg = ModelConfig(layout=Layout.imagenet, depth=depth, shortcut=Shortcut.B)
    model = build_model(cfg, (3, 224, 224), 1000)
    assert count_parameters(model) == expected
    assert model.stem.conv.kernel_size == (7, 7) and hasattr(model.stem, "pool")  # the ImageNet stem


def test_stem_rule_small_inputs_get_a_3x3_stride_1_stem() -> None:
    cfg = ModelConfig(layout=Layout.imagenet, depth=18, shortcut=Shortcut.B)
    small = build_model(cfg, (1, 28, 28), 10)
    assert small.stem.conv.kernel_size == (3, 3) and small.stem.conv.stride == (1, 1)
    assert not hasattr(small.stem, "pool")
    forced = build_model(ModelConfig(layout=Layout.imagenet, depth=18, stem=Stem.large), (1, 28, 28), 10)
    assert forced.stem.conv.kernel_size == (7, 7)


def test_depth_counts_weighted_layers_on_the_main_path() -> None:
    for depth in (8, 20, 56):
        assert len(weighted_layers(build_model(cifar(depth, "plain"), (1, 8, 8), 10))) == depth
    # option B adds 2 projections (16->32, 32->64) beside the 20 layers of the main path
    assert len(weighted_layers(build_model(cifar(20, shortcut=Shortcut.B), (1, 8, 8), 10))) == 22


def test_option_a_shortcut_is_parameter_free_and_option_b_projects() -> None:
    a = count_parameters(build_model(cifar(20, shortcut=Shortcut.A), (3, 32, 32), 10))
    b = count_parameters(build_model(cifar(20, shortcut=Shortcut.B), (3, 32, 32), 10))
    # two 1x1 projections with BatchNorm: 16*32 + 2*32 and 32*64 + 2*64
    assert b - a == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_article_model_is_the_seeds_layer_for_layer() -> None:
    cfg = ModelConfig(layout=Layout.article, depth=11, norm=Norm.none)
    model = build_model(cfg, (1, 28, 28), 10)
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0]) for _, m in weighted_layers(model)[:-1]]
    assert convs == [(1, 20, 5), (20, 30, 5), (30, 20, 3), (20, 40, 3), (40, 30, 5), (30, 40, 3),
                     (40, 80, 3), (80, 30, 5), (30, 80, 3), (80, 160, 3)]
    assert model.fc.in_features == 160 and model.fc.out_features == 10
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # on 8x8 digits the map reaches 1x1 after three pools and the fourth is skipped
    small = build_model(cfg, (1, 8, 8), 10)
    assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and small.fc.in_features == 160


@pytest.mark.parametrize("activation,norm,family,preact",
                         list(itertools.product(ACTIVATIONS, ["batch", "none"], ["plain", "resnet"], [False, True])))
def test_forward_and_backward_run_for_every_setting(activation: str, norm: str, family: str, preact: bool) -> None:
    cfg = cifar(8, family, activation=Activation[activation], norm=Norm[norm], preactivation=preact)
    model = build_model(cfg, (1, 8, 8), 10)
    out = model(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


def test_bottleneck_and_article_variants_run_backward() -> None:
    for cfg, shape in [(ModelConfig(layout=Layout.imagenet, depth=50, preactivation=True), (3, 32, 32)),
                       (ModelConfig(layout=Layout.article, depth=11, family=Family.plain,
                                    activation=Activation.sigmoid), (1, 28, 28))]:
        model = build_model(cfg, shape, 10)
        model(torch.randn(2, *shape)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_normal_init_uses_the_configured_std() -> None:
    from resnet_sweep.config import Init

    model = build_model(cifar(20, init=Init.normal, init_std=0.01), (1, 8, 8), 10)
    w = model.layer2[0].conv1.weight
    assert abs(w.std().item() - 0.01) < 0.002
