"""resnet_sweep: reproduce and extend He et al. 2015 and the seed article with Hydra configs, Optuna sweeps
and MLflow records. Entry points: `python -m resnet_sweep`, `.summary`, `.report`, `.bench`."""

from resnet_sweep.workers import watch_sweeper

watch_sweeper()  # in a sweep's worker process: end with the sweep (a no-op anywhere else)
