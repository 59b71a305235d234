"""The nets' vocabulary without torch: activation names and valid depths, shared by the config checks
(which also run in the sweeping process, which never imports torch: on a cluster's login node it stays
small) and by the models."""

from __future__ import annotations

# Add an activation here and its nn.Module class in models.ACTIVATIONS; config.Activation is made from these.
ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "gelu", "leaky_relu", "elu")

# He et al. 2015, Table 1: blocks per stage of the ImageNet nets.
IMAGENET_DEPTHS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}
ARTICLE_DEPTH = 11  # weighted layers of the seed article's model: 4 convs, 3 blocks of 2, 1 linear


def cifar_depths(limit: int = 1202) -> list[int]:
    """The CIFAR-style depths 6n+2 up to `limit` (1202 is the paper's deepest)."""
    return list(range(8, limit + 1, 6))
