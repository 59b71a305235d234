"""See a model without training it: `python -m resnet_sweep.summary model=<preset> [overrides]`.

Composes the same config as training (so the same overrides apply), builds the net for the data
preset's input shape, prints torchinfo's layer table and a last line `params: <N>`.
"""

from __future__ import annotations

import argparse

from hydra.errors import HydraException
from torchinfo import summary

from resnet_sweep.config import to_typed
from resnet_sweep.errors import UserError, exit_with
from resnet_sweep.models import build_model, count_parameters
from resnet_sweep.presets import compose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_sweep.summary",
        description="Print a net's layers, output shapes and parameter count without training it.\nThe overrides "
                    "are those of `python -m resnet_sweep`: the net is the one that command would train.",
        epilog="examples:\n  python -m resnet_sweep.summary model=resnet56\n"
               "  python -m resnet_sweep.summary model=plain20 data=cifar10 model.activation=sigmoid",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="group=option or key=value, as for python -m resnet_sweep")
    parser.add_argument("--depth", type=int, default=3, help="how many levels of modules to list (default 3)")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.overrides, job_name="summary")
        model_cfg, data_cfg = to_typed(cfg.model, "model."), to_typed(cfg.data, "data.")
    except HydraException as exc:  # an unknown preset or key: Hydra's message names it
        exit_with(UserError(str(exc)))
    except UserError as exc:
        exit_with(exc)
    model = build_model(model_cfg, data_cfg.input_shape, data_cfg.num_classes)
    print(summary(model, input_size=(1, *data_cfg.input_shape), depth=args.depth, verbose=0,
                  col_names=("output_size", "num_params")))
    n = count_parameters(model)
    print(f"params: {n} ({n / 1e6:.2f}M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
