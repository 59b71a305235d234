"""The lesion study (Veit et al. 2016): deleting a block is exactly skipping its residual branch, the net
comes back intact, and the study's numbers are the accuracies of those nets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resnet_sweep.config import Family, Layout, ModelConfig
from resnet_sweep.data import Split
from resnet_sweep.lesion import lesion_study
from resnet_sweep.models import build_model, lesioned, removable_blocks
from resnet_sweep.train import evaluate


def tiny(family: str = "resnet", depth: int = 14) -> nn.Sequential:
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=Family[family], layout=Layout.cifar, depth=depth), (1, 8, 8), 10)
    for m in model.modules():  # trained-looking BatchNorm statistics, not the identity ones of a fresh net
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_deletable_blocks_are_the_shape_keeping_ones_and_the_same_in_both_families() -> None:
    # depth 14: 2 blocks a stage; the first block of stages 2 and 3 halves the side and doubles the width
    expected = ["layer1.0", "layer1.1", "layer2.1", "layer3.1"]
    assert removable_blocks(tiny("resnet")) == removable_blocks(tiny("plain")) == expected


def test_a_lesioned_resnet_is_the_net_with_that_blocks_residual_branch_skipped() -> None:
    model, x = tiny(), torch.randn(16, 1, 8, 8)
    by_hand = copy.deepcopy(model)
    block = by_hand.get_submodule("layer2.1")
    # skip the residual branch by hand: F(x) = norm2(conv2(...)) = 0, so the block computes relu(0 + x)
    nn.init.zeros_(block.norm2.weight)
    nn.init.zeros_(block.norm2.bias)
    with torch.no_grad(), lesioned(model, ["layer2.1"]):
        deleted = model(x)
    with torch.no_grad():
        assert torch.allclose(deleted, by_hand(x), atol=1e-6)
        assert not torch.allclose(deleted, model(x), atol=1e-3)  # and the intact net differs


def test_the_net_is_whole_again_after_a_lesion() -> None:
    model, x = tiny(), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        with lesioned(model, removable_blocks(model)[:3]):
            pass
        assert torch.equal(model(x), before)
        assert all(not isinstance(model.get_submodule(n), nn.Identity) for n in removable_blocks(model))


@pytest.mark.parametrize("family", ["plain", "resnet"])
def test_the_study_records_the_accuracy_of_each_lesioned_net(family: str) -> None:
    model = tiny(family)
    split = Split(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    result = lesion_study(model, split, batch_size=32, draws=3, max_removed=2, seed=0)
    names = removable_blocks(model)
    assert result["lesion.intact_acc"] == {0: evaluate(model, split, 32)[1]}
    for i, name in enumerate(names):
        with lesioned(model, [name]):
            assert result["lesion.single_acc"][i] == evaluate(model, split, 32)[1]
    assert sorted(result["lesion.k_acc_mean"]) == [1, 2]
    for k in (1, 2):
        assert result["lesion.k_acc_min"][k] <= result["lesion.k_acc_mean"][k] <= result["lesion.k_acc_max"][k]
