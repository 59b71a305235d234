"""One job: config -> validate -> build model and data -> fit -> record (MLflow) -> the objective.

The training side of `python -m resnet_sweep`, imported by the job when it starts (resnet_sweep/__main__.py),
so that the sweeping process, which only asks, launches and waits, never imports torch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from resnet_sweep import data as datasets
from resnet_sweep import tracking
from resnet_sweep.config import SCHEDULER_SETTINGS, Config, Metric, settings, validate
from resnet_sweep.data import probe_batch
from resnet_sweep.diagnostics import RATIO_KEY, GradientNorms
from resnet_sweep.lesion import lesion_study
from resnet_sweep.models import build_model, count_parameters, removable_blocks
from resnet_sweep.stores import check_store
from resnet_sweep.train import NonFiniteLoss, build_optimizer, build_scheduler, fit, resolve_device, seed_everything
from resnet_sweep.trials import JobStopped, JobTrial, Pruned, TrialEnded
from resnet_sweep.workers import Stalled, cores, install_sigterm_handler, job_in_progress, label_logs, slurm_job

log = logging.getLogger("resnet_sweep")
# A fault for tests only, off unless this variable is set: a job training with this seed SIGKILLs its own
# process after its first epoch, as the kernel's out-of-memory killer would (tests/test_sweeps.py).
FAULT_SIGKILL_SEED = "RESNET_SWEEP_TEST_SIGKILL_SEED"


def run(cfg: DictConfig) -> float:
    tracking.job_started()
    tracking.mask_passwords_in_logs()
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    conf: Config = validate(cfg, sweep_direction=hc.sweeper.get("direction") if sweeping else None)
    resolve_device(conf.trainer.device)  # a device this machine lacks fails here, before any data or run
    if conf.tracking.enabled and not sweeping:  # a sweep checked its stores before it launched this job
        check_store(conf.tracking.uri, "tracking.uri")
    install_sigterm_handler()  # SIGTERM ends the run KILLED (and its trial FAIL) instead of vanishing
    label_logs(f"[trial {conf.sweep.trial}] " if sweeping and conf.sweep.trial is not None else "")
    threads = conf.trainer.threads or (worker_threads(hc) if sweeping else None)
    if threads:
        torch.set_num_threads(threads)
    # a job in a sweep's worker process ends with the sweep, and then ends the dead sweep's parent run too
    with job_in_progress(lambda why: tracking.end_study_run(cfg, "KILLED", why) if sweeping else None):
        # the storage comes from the sweeper's own config, not an override, so its password stays out of records
        trial = (JobTrial(conf.sweep.study, str(hc.sweeper.storage), conf.sweep.trial, hc.sweeper.get("pruner"),
                          hc.sweeper.get("heartbeat_interval", 5), hc.sweeper.get("grace_period", 20),
                          hc.sweeper.get("stall_timeout"), hc.sweeper.get("trial_timeout"))
                 if sweeping and conf.sweep.trial is not None else None)
        if trial is not None and trial.ended:
            log.warning("trial %d has already ended (%s): this job (requeued, or started twice) trains nothing",
                        trial.number, trial.ended)
            return math.nan
        try:
            objective = train_seeds(cfg, conf, trial, sweeping)
            if trial is not None:
                trial.finish(objective)  # the job tells its own result: it survives whatever befalls the sweeper
        except TrialEnded as exc:  # another process ended the trial (found it stale): nothing more to record
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


def train_seeds(cfg: DictConfig, conf: Config, trial: JobTrial | None, sweeping: bool) -> float:
    """The configured training over the sweep's seed repeats; returns the objective (their mean)."""
    values, run_ids = [], []
    for repeat in range(conf.sweep.seeds):  # seed repeats: never a search dimension, averaged here
        value, run_id, stopped = train_and_record(cfg, conf, conf.seed + repeat, trial, sweeping, reports=repeat == 0)
        values.append(value)
        run_ids.append(run_id)
        if stopped:
            break  # a diverged or pruned first seed decides the trial; more seeds would not change that
    objective = statistics.fmean(values)
    if conf.sweep.seeds > 1:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        log.info("objective %s over %d seeds: %.4f ± %.4f", conf.objective.name, len(values), objective, std)
        if trial is not None:
            trial.set(objective_per_seed=values, objective_std=std, mlflow_run_ids=run_ids)
    return objective


def train_and_record(cfg: DictConfig, conf: Config, seed: int, trial: JobTrial | None, sweeping: bool,
                     reports: bool = True) -> tuple[float, str | None, bool]:
    """One training of the configured net with `seed`, recorded as one MLflow run:
    (objective, run id, whether it stopped early: diverged in a sweep, or pruned).

    With `reports`, this training is the one whose epochs go to the trial (pruning) and whose run the
    trial points to; further seed repeats only carry the trial's tags.
    """
    hc = HydraConfig.get()
    if seed != conf.seed:  # the run's params must say which seed it trained with
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.seed = seed
    generator = seed_everything(seed)
    device = resolve_device(conf.trainer.device)
    model = build_model(conf.model, conf.data.input_shape, conf.data.num_classes).to(device)
    if conf.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = datasets.load(conf.data, device)  # a missing dataset fails here, before any run is recorded
    opt = build_optimizer(model.parameters(), conf.optimizer)
    train_model = torch.compile(model) if conf.trainer.compile else model  # same parameters, compiled graph
    scheduler = build_scheduler(opt, conf.scheduler, conf.trainer.epochs)
    n_params = count_parameters(model)
    log.info("%s-%d (%s layout, %s, norm %s) on %s (%d train / %d val / %d test) on %s, %s parameters, seed %d",
             conf.model.family.name, conf.model.depth, conf.model.layout.name, conf.model.activation.name,
             conf.model.norm.name, conf.data.name.name, len(data.train), len(data.val), len(data.test), device,
             f"{n_params:,}", seed)
    gradients = GradientNorms(model) if conf.trainer.grad_norms else None
    objective = conf.objective.name
    trial_tags = {} if trial is None else {"optuna.study": conf.sweep.study, "optuna.trial": trial.number}
    trial_tags.update(slurm_job())
    run_id = None
    try:
        with tracking.job_run(cfg, {**trial_tags, "seed": seed}) as run:
            run_id = run.run_id if run is not None else None
            if trial is not None and reports:
                trial.set(mlflow_run_id=run_id, job_dir=str(hc.runtime.output_dir))
            if run is not None:
                run.log_dataset(conf.data.name.name, len(data.train), len(data.val), len(data.test))
                run.log_params({"model.num_parameters": n_params, "device": device,
                                "torch.threads": torch.get_num_threads()})
            if gradients is not None:
                x, y = probe_batch(data.train, conf.trainer.grad_probe_size, conf.data.split_seed)
                at_init = gradients.at_init(model, x, y)
                log.info("gradient first/last layer ratio at init: %.3g", at_init[RATIO_KEY])
                if run is not None:
                    run.log_metrics(at_init, step=0)
                    run.log_text("\n".join(gradients.names), "grad_layers.txt")

            def on_epoch(metrics: dict[str, float], epoch: int) -> None:
                # the trial first: should another process have ended it, nothing more is recorded (TrialEnded)
                prune = (trial is not None and reports and objective in metrics
                         and trial.should_prune(metrics[objective], epoch))
                if run is not None:
                    run.log_metrics(metrics, epoch, wait=False)  # written while the next epoch trains
                if os.environ.get(FAULT_SIGKILL_SEED) == str(seed):
                    os.kill(os.getpid(), signal.SIGKILL)
                # after the last epoch there is nothing left to save: the trial completes
                if prune and epoch < conf.trainer.epochs:
                    raise Pruned(epoch, metrics[objective])

            best = Path(hc.runtime.output_dir) / "best.pt" if conf.trainer.save_best else None
            try:
                metrics = fit(train_model, data, opt, scheduler, conf.trainer, generator, augment=conf.data.augment,
                              monitor=settings(conf.scheduler, SCHEDULER_SETTINGS).get("monitor", Metric.val_loss).name,
                              best_checkpoint=best, gradients=gradients,
                              on_epoch=on_epoch, on_step=trial.step if trial is not None else None)
            except Pruned as pruned:
                # the run ends normally, tagged with where it stopped; the trial is told PRUNED
                log.info("trial %d pruned after epoch %d (%s %.4g)", trial.number, pruned.epoch, objective, pruned.value)
                if run is not None:
                    run.set_tags({"pruned_at_epoch": pruned.epoch})
                trial.set(pruned_at_epoch=pruned.epoch)
                return pruned.value, run_id, True
            if run is not None:
                run.log_metrics({k: metrics[k] for k in ("test_loss", "test_acc")}, step=conf.trainer.epochs)
                value = metrics[objective]
                run.name_result(f"{100 * value:.1f}%" if objective.endswith("acc") else f"loss {value:.4g}")
                if best is not None:
                    run.log_artifact(best)
            if conf.lesion.enabled:
                lesions = lesion_study(model, data.test, conf.trainer.eval_batch_size, conf.lesion.draws,
                                       conf.lesion.max_removed, seed)
                single = list(lesions["lesion.single_acc"].values())
                log.info("lesion: test acc %.2f%% intact; one block deleted: mean %.2f%%, worst %.2f%% (%d blocks)",
                         100 * lesions["lesion.intact_acc"][0], 100 * sum(single) / max(len(single), 1),
                         100 * min(single, default=float("nan")), len(single))
                if run is not None:
                    run.log_series(lesions)
                    run.log_text("\n".join(removable_blocks(model)), "lesion_blocks.txt")
    except NonFiniteLoss as exc:
        if not sweeping:
            raise
        log.error("trial diverged: %s; recorded as FAILED, the sweep goes on", exc)
        if trial is not None:
            trial.set(fail_reason=f"NonFiniteLoss: {exc}")
        return math.nan, run_id, True  # a NaN objective is told FAIL, and the sweep goes on
    return metrics[objective], run_id, False
