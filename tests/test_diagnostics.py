"""Gradient norms per layer: the article's three causes of vanishing gradients show at initialisation."""

from __future__ import annotations

import torch

from resnet_sweep.config import Activation, DataConfig, Family, Init, ModelConfig, Norm, TrainerConfig
from resnet_sweep.data import load, probe_batch
from resnet_sweep.diagnostics import RATIO_KEY, GradientNorms
from resnet_sweep.models import build_model, weighted_layers
from resnet_sweep.config import OptimizerConfig
from resnet_sweep.train import build_optimizer, fit, seed_everything

DATA = load(DataConfig(), torch.device("cpu"))
X, Y = probe_batch(DATA.train, 128, 0)


def at_init(**kw) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**kw), (1, 8, 8), 10)
    return GradientNorms(model).at_init(model, X, Y)


def ratio_at_init(**kw) -> float:
    return at_init(**kw)[RATIO_KEY]


def test_sigmoid_plain_net_without_bn_vanishes_and_the_relu_resnet_does_not() -> None:
    sigmoid_plain = ratio_at_init(family=Family.plain, depth=20, activation=Activation.sigmoid, norm=Norm.none)
    relu_resnet = ratio_at_init(family=Family.resnet, depth=20, activation=Activation.relu, norm=Norm.batch)
    assert sigmoid_plain < 1e-6 < 1e-2 < relu_resnet


def test_the_shortcut_lifts_a_sigmoid_net_by_orders_of_magnitude() -> None:
    plain = ratio_at_init(family=Family.plain, depth=20, activation=Activation.sigmoid, norm=Norm.none)
    resnet = ratio_at_init(family=Family.resnet, depth=20, activation=Activation.sigmoid, norm=Norm.none)
    preact = ratio_at_init(family=Family.resnet, depth=20, activation=Activation.sigmoid, norm=Norm.none,
                           preactivation=True)
    assert resnet > 1e3 * max(plain, 1e-30)
    assert preact > 1e3 * resnet  # a clean identity path (He et al. 2016) keeps far more of the gradient


def test_small_init_shrinks_every_layers_gradient_and_batchnorm_undoes_it() -> None:
    # With N(0, 0.01^2) weights both the forward signal and the backward gradient shrink layer by layer,
    # so every weight gradient (a product of the two) is tiny, the first layer's as much as the last's.
    common = dict(family=Family.plain, depth=20, activation=Activation.relu)
    kaiming = at_init(**common, norm=Norm.none)["weight_grad/000"]
    small = at_init(**common, norm=Norm.none, init=Init.normal, init_std=0.01)["weight_grad/000"]
    small_bn = at_init(**common, norm=Norm.batch, init=Init.normal, init_std=0.01)["weight_grad/000"]
    assert small < 1e-6 * kaiming
    assert small_bn > 1e3 * small


def test_the_init_probe_leaves_the_model_as_it_found_it() -> None:
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = GradientNorms(model).at_init(model, X, Y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert len([k for k in record if k.startswith("weight_grad/")]) == len(weighted_layers(model)) == 8


def test_each_epoch_records_one_norm_per_layer_from_training_steps() -> None:
    model = build_model(ModelConfig(depth=8), (1, 8, 8), 10)
    gradients = GradientNorms(model, last_steps=3)
    seen = []
    fit(model, DATA, build_optimizer(model.parameters(), OptimizerConfig(lr=0.05, settings={"momentum": 0.9})), None,
        TrainerConfig(epochs=2, batch_size=256), seed_everything(0), gradients=gradients,
        on_epoch=lambda metrics, epoch: seen.append(metrics))
    assert len(seen) == 2
    for metrics in seen:
        norms = [v for k, v in metrics.items() if k.startswith("weight_grad/")]
        assert len(norms) == 8 and all(v > 0 for v in norms)
        assert metrics[RATIO_KEY] == norms[0] / norms[-1]
