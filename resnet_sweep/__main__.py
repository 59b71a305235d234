"""Entry point: `python -m resnet_sweep [overrides]` trains one net; add `-m` to sweep with Optuna.

compose (Hydra) -> validate -> build model and data -> fit -> record (MLflow) -> return the objective.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from resnet_sweep import data as datasets
from resnet_sweep.data import probe_batch
from resnet_sweep import tracking
from resnet_sweep.config import Config, validate
from resnet_sweep.diagnostics import RATIO_KEY, GradientNorms
from resnet_sweep.models import build_model, count_parameters
from resnet_sweep.train import NonFiniteLoss, build_optimizer, build_scheduler, fit, resolve_device, seed_everything

log = logging.getLogger("resnet_sweep")
# Hydra 1.4 warns for every config-named _target_ instantiated without an execution whitelist, and
# gives callbacks no way to pass one. Ours (conf/config.yaml: hydra.callbacks) is our own code.
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved _target_='resnet_sweep\.",
                        category=UserWarning)


@hydra.main(config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    conf: Config = validate(cfg, sweep_direction=hc.sweeper.get("direction") if sweeping else None)
    if conf.trainer.threads:
        torch.set_num_threads(conf.trainer.threads)
    generator = seed_everything(conf.seed)
    device = resolve_device(conf.trainer.device)
    model = build_model(conf.model, conf.data.input_shape, conf.data.num_classes).to(device)
    if conf.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = datasets.load(conf.data, device)  # a missing dataset fails here, before any run is recorded
    opt = build_optimizer(model.parameters(), conf.optimizer)
    train_model = torch.compile(model) if conf.trainer.compile else model  # same parameters, compiled graph
    scheduler = build_scheduler(opt, conf.scheduler, conf.trainer.epochs)
    n_params = count_parameters(model)
    log.info("%s-%d (%s layout, %s, norm %s) on %s (%d train / %d val / %d test) on %s, %s parameters",
             conf.model.family.name, conf.model.depth, conf.model.layout.name, conf.model.activation.name,
             conf.model.norm.name, conf.data.name.name, len(data.train), len(data.val), len(data.test), device, f"{n_params:,}")
    gradients = GradientNorms(model) if conf.trainer.grad_norms else None
    try:
        with tracking.job_run(cfg) as run:
            if run is not None:
                run.log_params({"model.num_parameters": n_params, "device": device})
            if gradients is not None:
                x, y = probe_batch(data.train, conf.trainer.grad_probe_size, conf.data.split_seed)
                at_init = gradients.at_init(model, x, y)
                log.info("gradient first/last layer ratio at init: %.3g", at_init[RATIO_KEY])
                if run is not None:
                    run.log_metrics(at_init, step=0)
                    run.log_text("\n".join(gradients.names), "grad_layers.txt")
            best = Path(hc.runtime.output_dir) / "best.pt" if conf.trainer.save_best else None
            metrics = fit(train_model, data, opt, scheduler, conf.trainer, generator, augment=conf.data.augment,
                          monitor=conf.scheduler.monitor.name, best_checkpoint=best, gradients=gradients,
                          on_epoch=run.log_metrics if run is not None else None)
            if run is not None:
                run.log_metrics({k: metrics[k] for k in ("test_loss", "test_acc")}, step=conf.trainer.epochs)
                if best is not None:
                    run.log_artifact(best)
    except NonFiniteLoss as exc:
        if not sweeping:
            raise
        log.error("trial diverged: %s; recorded as FAILED, the sweep goes on", exc)
        return math.nan  # the Optuna sweeper marks a NaN trial FAIL instead of aborting the sweep
    return metrics[conf.objective.name]


if __name__ == "__main__":
    main()
