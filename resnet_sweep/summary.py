"""See a model without training it: `python -m resnet_sweep.summary model=<preset> [overrides]`.

Composes the same config as training (so the same overrides apply), builds the net for the data
preset's input shape, prints torchinfo's layer table and a last line `params: <N>`.
"""

from __future__ import annotations

import sys
from torchinfo import summary

from resnet_sweep.config import to_typed
from resnet_sweep.models import build_model, count_parameters
from resnet_sweep.presets import compose

def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    cfg = compose(overrides, job_name="summary")
    model_cfg, data_cfg = to_typed(cfg.model), to_typed(cfg.data)
    model = build_model(model_cfg, data_cfg.input_shape, data_cfg.num_classes)
    print(summary(model, input_size=(1, *data_cfg.input_shape), depth=3, verbose=0,
                  col_names=("output_size", "num_params")))
    n = count_parameters(model)
    print(f"params: {n} ({n / 1e6:.2f}M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
