"""One job, top to bottom: the composed config -> validated -> model, data, optimizer built -> fit, with
the epochs handed to two callbacks (recording to MLflow, reporting to the sweep's trial) -> the run's
end -> the objective, returned to Hydra.

Imported when a job starts (resnet_sweep/__main__.py), so that a sweeping process, which only asks,
launches and waits, never imports torch.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo  # noqa: F401 (the first optimizer step imports it: here, so no stall limit cuts an import)
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from resnet_sweep import data as datasets
from resnet_sweep import memory_format, stores, tracking
from resnet_sweep.config import Config, validate
from resnet_sweep.data import Data, probe_batch
from resnet_sweep.diagnostics import RATIO_KEY, GradientNorms
from resnet_sweep.lesion import lesion_study
from resnet_sweep.models import build_model, count_parameters, flops_per_sample, removable_blocks
from resnet_sweep.train import (NonFiniteLoss, Schedule, build_optimizer, build_schedule, fit, resolve_device,
                                 seed_everything, steps_per_epoch)
from resnet_sweep.trials import JobStopped, JobTrial, TrialEnded
from resnet_sweep.workers import Stalled, cores, install_sigterm_handler, job_in_progress, label_logs, slurm_job

log = logging.getLogger("resnet_sweep")


class Pruned(Exception):
    """Raised in a job when its trial's pruner says stop, after `epoch` with objective `value`."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.value = epoch, value


def run(cfg: DictConfig) -> float:
    """The task function's body: a single run, or one trial of a sweep (which tells its trial the result)."""
    tracking.job_started()
    stores.mask_passwords_in_logs()
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    conf: Config = validate(cfg, sweep_direction=hc.sweeper.get("direction") if sweeping else None)
    resolve_device(conf.trainer.device)  # a device this machine lacks fails here, before any data or run
    # the store was checked before: a single run's in __main__ (before these imports), a sweep's by the sweeper
    install_sigterm_handler()  # SIGTERM ends the run KILLED (and its trial FAIL) instead of vanishing
    label_logs(f"[trial {conf.sweep.trial}] " if sweeping and conf.sweep.trial is not None else "")
    threads = conf.trainer.threads or (worker_threads(hc) if sweeping else None)
    if threads:
        torch.set_num_threads(threads)
    # a job in a sweep's worker process ends with the sweep, and then ends the dead sweep's parent run too
    with job_in_progress(lambda why: tracking.end_study_run(cfg, "KILLED", why) if sweeping else None):
        # the storage comes from the sweeper's own config, not an override, so its password stays out of records
        trial = (JobTrial(conf.sweep.study, str(hc.sweeper.storage), conf.sweep.trial, hc.sweeper)
                 if sweeping and conf.sweep.trial is not None else None)
        if trial is not None and trial.ended:
            log.warning("trial %d has already ended (%s): this job (requeued, or started twice) trains nothing",
                        trial.number, trial.ended)
            return math.nan
        try:
            objective = train_seeds(cfg, conf, trial, sweeping)
            if trial is not None:
                trial.finish(objective)  # the job tells its own result: it survives whatever befalls the sweeper
        except (TrialEnded, tracking.RunEnded) as exc:  # another process ended it (found it stale): record no more
            log.warning("%s; this job stops and records nothing over it", exc)
            return math.nan
        except BaseException as exc:
            if trial is not None:
                trial.fail(exc)  # its own failure, or an interruption (Ctrl-C, SIGTERM): then it is retried
            if isinstance(exc, Stalled):  # the trial is interrupted; the launcher hands the sweep a failed job
                raise JobStopped(str(exc)) from None
            raise
        finally:
            if trial is not None:
                trial.close()
            label_logs("")  # the sweeping process's own lines, where the job ran in it (workers=serial)
    return objective


def worker_threads(hc: DictConfig) -> int | None:
    """Torch threads for a job in a parallel worker: the cores shared out among the workers (one each when
    there is a worker per core); a SLURM job's CPUs; None (torch's default, every core) otherwise."""
    launcher = hc.runtime.choices.get("hydra/launcher")
    if launcher == "submitit_slurm":  # the CPUs SLURM gave the job (hydra.launcher.cpus_per_task)
        return int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
    if launcher != "joblib":
        return None
    return max(1, cores() // max(1, int(hc.launcher.n_jobs)))


def train_seeds(cfg: DictConfig, conf: Config, trial: JobTrial | None, sweeping: bool) -> float | list[float]:
    """The configured training over the sweep's seed repeats; returns the objective (their mean), or with
    several objectives the list of their means."""
    values, run_ids = [], []
    for repeat in range(conf.sweep.seeds):  # seed repeats: never a search dimension, averaged here
        value, run_id, stopped = train_once(cfg, conf, conf.seed + repeat, trial, sweeping, reports=repeat == 0)
        values.append(value)
        run_ids.append(run_id)
        if stopped:
            break  # a diverged or pruned first seed decides the trial; more seeds would not change that
    means = [statistics.fmean(per_seed) for per_seed in zip(*values)]
    if conf.sweep.seeds > 1:
        stds = [statistics.stdev(per_seed) if len(values) > 1 else 0.0 for per_seed in zip(*values)]
        for name, mean, std in zip(conf.objective, means, stds):
            log.info("objective %s over %d seeds: %.4f ± %.4f", name, len(values), mean, std)
        if trial is not None:
            trial.set(objective_per_seed=[v[0] for v in values], objective_std=stds[0], mlflow_run_ids=run_ids,
                      **({"objectives_per_seed": values, "objectives_std": stds} if len(means) > 1 else {}))
    return means[0] if len(means) == 1 else means


@dataclass
class Built:
    """What one training needs, built from the config."""

    model: torch.nn.Module
    data: Data
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    gradients: GradientNorms | None
    generator: torch.Generator
    device: torch.device


def build(conf: Config, seed: int) -> Built:
    generator = seed_everything(seed)
    device = resolve_device(conf.trainer.device)
    model = build_model(conf.model, conf.data.input_shape, conf.data.num_classes).to(device)
    data = datasets.load(conf.data, device)  # a missing dataset fails here, before any run is recorded
    model = memory_format.choose(model, data.train, conf.trainer, device)
    optimizer = build_optimizer(model.parameters(), conf.optimizer)
    log.info("%s-%d (%s layout, %s, norm %s) on %s (%d train / %d val / %d test) on %s, %s parameters, seed %d",
             conf.model.family.name, conf.model.depth, conf.model.layout.name, conf.model.activation.name,
             conf.model.norm.name, conf.data.name.name, len(data.train), len(data.val), len(data.test), device,
             f"{count_parameters(model):,}", seed)
    schedule = build_schedule(optimizer, conf.scheduler, conf.trainer.epochs, steps_per_epoch(data, conf.trainer.batch_size))
    return Built(model, data, optimizer, schedule,
                 GradientNorms(model) if conf.trainer.grad_norms else None, generator, device)


def train_once(cfg: DictConfig, conf: Config, seed: int, trial: JobTrial | None, sweeping: bool,
               reports: bool = True) -> tuple[list[float], str | None, bool]:
    """One training of the configured net with `seed`, recorded as one MLflow run: (objectives, run id,
    whether it stopped early: diverged in a sweep, or pruned). With `reports`, this training is the one
    whose epochs go to the trial (pruning) and whose run the trial points to."""
    if seed != conf.seed:  # the run's params must say which seed it trained with
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.seed = seed
    built, job_dir = build(conf, seed), Path(HydraConfig.get().runtime.output_dir)
    tags = {"seed": seed, **slurm_job(), **({} if trial is None else
                                            {"optuna.study": conf.sweep.study, "optuna.trial": trial.number})}
    run_id = None
    try:
        with tracking.job_run(cfg, tags) as run:
            run_id = run.run_id if run is not None else None
            if trial is not None and reports:
                trial.set(mlflow_run_id=run_id, job_dir=str(job_dir))
            size = record_start(run, conf, built)
            callbacks = [c for c in (report_to(trial, conf) if reports else None, record_to(run)) if c]

            def on_epoch(metrics: dict[str, float], epoch: int) -> None:
                for callback in callbacks:
                    callback(metrics, epoch)

            best = job_dir / "best.pt" if conf.trainer.save_best else None
            started = time.perf_counter()
            try:
                metrics = fit(built.model if not conf.trainer.compile else torch.compile(built.model), built.data,
                              built.optimizer, built.schedule, conf.trainer, built.generator,
                              augment=conf.data.augment, best_checkpoint=best, gradients=built.gradients,
                              on_epoch=on_epoch, on_step=trial.step if trial is not None else None,
                              progress=not sweeping and sys.stderr.isatty())  # a bar in a terminal, lines elsewhere
            except Pruned as pruned:  # the run ends normally, tagged with where it stopped; the trial is PRUNED
                log.info("trial %d pruned after epoch %d (%s %.4g)", trial.number, pruned.epoch, conf.objective[0],
                         pruned.value)
                if run is not None:
                    run.set_tags({"pruned_at_epoch": pruned.epoch})
                trial.set(pruned_at_epoch=pruned.epoch)
                return [pruned.value], run_id, True
            metrics.update(size, train_seconds=time.perf_counter() - started)
            record_end(run, conf, built, metrics, best, seed)
    except NonFiniteLoss as exc:
        if not sweeping:
            raise
        log.error("trial diverged: %s; recorded as FAILED, the sweep goes on", exc)
        if trial is not None:
            trial.set(fail_reason=f"NonFiniteLoss: {exc}")
        return [math.nan] * len(conf.objective), run_id, True  # a NaN objective is told FAIL, the sweep goes on
    return [metrics[name] for name in conf.objective], run_id, False


def record_start(run: tracking.JobRun | None, conf: Config, built: Built) -> dict[str, float]:
    """The run's data, size and threads, and the per-layer gradient norms at initialisation; returns the
    net's size (config.COSTS: recorded on every run, objectives where asked; train_seconds comes at the end)."""
    size = {"num_parameters": float(count_parameters(built.model)),
            "flops_per_sample": float(flops_per_sample(built.model, tuple(conf.data.input_shape)))}
    if run is not None:
        data = built.data
        run.log_dataset(conf.data.name.name, len(data.train), len(data.val), len(data.test))
        run.log_params({"model.num_parameters": int(size["num_parameters"]), "optimizer.name": conf.optimizer.name,
                        "device": built.device, "torch.threads": torch.get_num_threads(),
                        "memory_format": "channels_last" if conf.trainer.channels_last else "contiguous"})
        run.log_metrics(size, step=0)
    if built.gradients is not None:
        x, y = probe_batch(built.data.train, conf.trainer.grad_probe_size, conf.data.split_seed)
        at_init = built.gradients.at_init(built.model, x, y)
        log.info("gradient first/last layer ratio at init: %.3g", at_init[RATIO_KEY])
        if run is not None:
            run.log_metrics(at_init, step=0)
            run.log_text("\n".join(built.gradients.names), "grad_layers.txt")
    return size


def report_to(trial: JobTrial | None, conf: Config) -> Callable[[dict[str, float], int], None] | None:
    """The callback that reports each epoch's objective to the trial, first of the epoch's callbacks: it
    raises Pruned when the pruner says so (after the last epoch there is nothing left to save), and
    TrialEnded when another process has ended the trial, before anything more is recorded."""
    if trial is None:
        return None
    objective = conf.objective[0]  # one objective: several are refused with a pruner (sweeper.py)

    def report(metrics: dict[str, float], epoch: int) -> None:
        if objective in metrics and trial.should_prune(metrics[objective], epoch) and epoch < conf.trainer.epochs:
            raise Pruned(epoch, metrics[objective])

    return report


def record_to(run: tracking.JobRun | None) -> Callable[[dict[str, float], int], None] | None:
    """The callback that records each epoch's metrics, written while the next epoch trains."""
    return None if run is None else lambda metrics, epoch: run.log_metrics(metrics, epoch, wait=False)


def record_end(run: tracking.JobRun | None, conf: Config, built: Built, metrics: dict[str, float],
               best: Path | None, seed: int) -> None:
    """The test metrics, the run's name with its result, the best checkpoint, and the lesion study."""
    if run is not None:
        # train_seconds: fit's wall time (training, each epoch's validation and recording; parallel trials share cores)
        run.log_metrics({k: metrics[k] for k in ("test_loss", "test_acc", "train_seconds")}, step=conf.trainer.epochs)
        name, value = conf.objective[0], metrics[conf.objective[0]]
        run.name_result(f"{100 * value:.1f}%" if name.endswith("acc") else
                        f"loss {value:.4g}" if name.endswith("loss") else f"{name} {value:.4g}")
        if best is not None:
            run.log_artifact(best)
    if conf.lesion.enabled:
        lesions = lesion_study(built.model, built.data.test, conf.trainer.eval_batch_size, conf.lesion.draws,
                               conf.lesion.max_removed, seed)
        single = list(lesions["lesion.single_acc"].values())
        log.info("lesion: test acc %.2f%% intact; one block deleted: mean %.2f%%, worst %.2f%% (%d blocks)",
                 100 * lesions["lesion.intact_acc"][0], 100 * sum(single) / max(len(single), 1),
                 100 * min(single, default=float("nan")), len(single))
        if run is not None:
            run.log_series(lesions)
            run.log_text("\n".join(removable_blocks(built.model)), "lesion_blocks.txt")
