"""The lesion study of Veit, Wilber and Belongie 2016 ("Residual Networks Behave Like Ensembles of
Relatively Shallow Networks"): delete blocks from a trained net at test time and measure what is left.

Their finding on CIFAR-10: a ResNet keeps most of its accuracy with any one block deleted and degrades
smoothly as more go, while deleting one layer of a plain net destroys it. Nothing here trains, and
nothing knows of Hydra or MLflow: `lesion_study` takes a trained model and a split, returns numbers.
"""

from __future__ import annotations

import random
import statistics

from torch import nn

from resnet_sweep.data import Split
from resnet_sweep.models import lesioned, removable_blocks
from resnet_sweep.train import evaluate


def lesion_study(model: nn.Module, split: Split, batch_size: int, draws: int, max_removed: int,
                 seed: int) -> dict[str, dict[int, float]]:
    """Accuracy on `split` of the intact net, of the net without each removable block in turn, and without
    k random removable blocks (k = 1..max_removed, `draws` seeded draws each):
    {"lesion.intact_acc": {0: acc}, "lesion.single_acc": {i: acc without block i}, "lesion.k_acc_mean":
    {k: mean}, "lesion.k_acc_min": {k: worst}, "lesion.k_acc_max": {k: best}} (i counts removable blocks
    from 0, input side first; names in `removable_blocks(model)`)."""
    names = removable_blocks(model)
    out: dict[str, dict[int, float]] = {"lesion.intact_acc": {0: evaluate(model, split, batch_size)[1]},
                                        "lesion.single_acc": {}, "lesion.k_acc_mean": {}, "lesion.k_acc_min": {},
                                        "lesion.k_acc_max": {}}
    for i, name in enumerate(names):
        with lesioned(model, [name]):
            out["lesion.single_acc"][i] = evaluate(model, split, batch_size)[1]
    rng = random.Random(seed)
    for k in range(1, min(max_removed, len(names)) + 1):
        accs = []
        for _ in range(draws):
            with lesioned(model, rng.sample(names, k)):
                accs.append(evaluate(model, split, batch_size)[1])
        out["lesion.k_acc_mean"][k] = statistics.fmean(accs)
        out["lesion.k_acc_min"][k], out["lesion.k_acc_max"][k] = min(accs), max(accs)
    return out
