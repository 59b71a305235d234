"""resnet_sweep: reproduce and extend He et al. 2015 and the seed article with Hydra configs, Optuna sweeps
and MLflow records. Entry points: `python -m resnet_sweep`, `.summary`, `.report`, `.bench`."""

import os

# No outbound connection the user did not ask for: MLflow's usage telemetry is off unless the user sets
# MLFLOW_DISABLE_TELEMETRY=false. Set before anything imports MLflow; jobs and workers inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from resnet_sweep.workers import watch_sweeper  # noqa: E402

watch_sweeper()  # in a sweep's worker process: end with the sweep (a no-op anywhere else)
