"""The official Hydra Optuna sweeper, extended for long sweeps: resume, pruning, failures as data.

Why a subclass and not the plugin as is: hydra-optuna-sweeper 1.4.0rc3 asks and tells trials in the
sweeping process, so (1) a job never sees its trial and cannot report epochs for pruning, (2) a rerun adds
n_trials more instead of finishing the study, (3) trials of a killed sweep stay RUNNING forever (Optuna's
heartbeat only runs inside study.optimize), (4) a NaN return or a raising job can abort the sweep. This
keeps the official search-space parsing, samplers, config schema and launcher hand-off, and replaces only
`sweep()`; choose it with `hydra/sweeper=resnet_optuna` (the default in conf/config.yaml).

How job, trial and run find each other: the sweeper passes `sweep.study`, `sweep.trial` and
`sweep.storage` to each job as config values; the job stores its MLflow run id in the trial's user attrs
(`mlflow_run_id`) and tags the run with the study, trial number and job folder.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from resnet_sweep import tracking

log = logging.getLogger(__name__)
# Optuna marks storage heartbeats experimental and meant for study.optimize; we beat ourselves (_heartbeat).
warnings.filterwarnings("ignore", message=r".*heartbeat", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Terminated(BaseException):
    """SIGTERM (SLURM's preemption notice) as an exception, so runs and trials are closed on the way out."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def install_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@dataclass
class ResnetOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "resnet_sweep.sweeper.ResnetOptunaSweeper"
    # An optuna.pruners class as an instantiate config; conf/pruner/ holds none, median, ... presets.
    pruner: Optional[Any] = None
    # RDB storages get Optuna's heartbeat: a RUNNING trial silent for grace_period seconds belonged to a
    # sweep that died, and is marked FAIL (its MLflow run KILLED) by the next sweep of the study.
    heartbeat_interval: int = 5
    grace_period: int = 20


ConfigStore.instance().store(group="hydra/sweeper", name="resnet_optuna", node=ResnetOptunaSweeperConf,
                             provider="resnet_sweep")


class ResnetOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None, params: DictConfig | None,
                 pruner: Any = None, heartbeat_interval: int = 5, grace_period: int = 20) -> None:
        sampler = instantiate(sampler, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*",
                                                              "optuna.samplers.*"))
        self.impl = _Impl(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                          custom_search_space, params)
        self.impl.pruner = (instantiate(pruner, _execution_whitelist_=("optuna.pruners.*",)) if pruner
                            else optuna.pruners.NopPruner())
        self.impl.heartbeat_interval, self.impl.grace_period = heartbeat_interval, grace_period

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.impl.sweep(arguments)


class _Impl(OptunaSweeperImpl):
    pruner: optuna.pruners.BasePruner
    heartbeat_interval: int
    grace_period: int

    def _storage(self) -> Any:
        if isinstance(self.storage, str) and not self.storage.startswith("journal"):
            # RDB: SQLite (with a busy timeout, for parallel workers) or PostgreSQL, with the heartbeat
            kwargs = {"connect_args": {"timeout": 60}} if self.storage.startswith("sqlite") else {}
            return optuna.storages.RDBStorage(self.storage, engine_kwargs=kwargs,
                                              heartbeat_interval=self.heartbeat_interval,
                                              grace_period=self.grace_period)
        return self.storage

    def sweep(self, arguments: list[str]) -> None:
        install_sigterm_handler()
        self._process_searchspace_config()
        space, fixed, fixed_overrides = create_params_from_overrides(self._parse_sweeper_params_config()
                                                                     + list(arguments))
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        for name in fixed:
            space.pop(name, None)
        directions = self._get_directions()
        storage = self._storage()
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=self.sampler,
                                    pruner=self.pruner, directions=directions, load_if_exists=True)
        parent = tracking.StudyRun(self.config, study, self.sampler, self.pruner, space)
        self._fail_stale(study, parent)
        self.job_idx = len(study.trials)  # job numbers continue across reruns: job number = trial number
        log.info("Study %s in %s: %d trials finished of n_trials=%d", study.study_name,
                 tracking.safe_url(str(self.storage)), _count(study, FINISHED), self.n_trials)
        try:
            while (to_go := self.n_trials - _count(study, (*FINISHED, TrialState.RUNNING))) > 0:
                trials = [study.ask() for _ in range(min(self.n_jobs, to_go))]
                overrides = [(*o, f"sweep.study={study.study_name}", f"sweep.trial={t.number}")
                             for o, t in zip(self._configure_trials(trials, space, fixed, fixed_overrides), trials)]
                with _heartbeat(storage, trials, self.heartbeat_interval):
                    try:
                        returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                    except BaseException as exc:  # SIGTERM, Ctrl-C: close what was in flight, then go
                        for t in trials:
                            _close(study, t, TrialState.FAIL, f"sweep interrupted: {type(exc).__name__}: {exc}")
                            parent.kill_trial_run(_attrs(study, t).get("mlflow_run_id"), f"{type(exc).__name__}: {exc}")
                        raise
                self.job_idx += len(returns)
                for trial, ret in zip(trials, returns):
                    self._tell(study, trial, ret)
        finally:
            self._fail_stale(study, parent)
        self._finish(study, parent)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
        attrs = _attrs(study, trial)  # what the job wrote
        if ret.status == JobStatus.FAILED:
            error = ret._return_value  # the job's exception (hydra keeps it there)
            _close(study, trial, TrialState.FAIL, attrs.get("fail_reason") or f"{type(error).__name__}: {error}")
            return
        value = ret.return_value
        if "pruned_at_epoch" in attrs:
            _close(study, trial, TrialState.PRUNED, None)
        elif value is None or not math.isfinite(float(value)):
            # never tell a NaN or an infinity as a value: it would be a trial's result, and inf the best one
            _close(study, trial, TrialState.FAIL, attrs.get("fail_reason") or f"objective was {value}")
        else:
            _tell(study, trial, TrialState.COMPLETE, [float(value)])

    def _fail_stale(self, study: optuna.Study, parent: tracking.StudyRun) -> None:
        """Trials left RUNNING by a sweep that died: FAIL in Optuna, KILLED in MLflow (with the reason as
        its failure_reason tag: Optuna allows no user attr on a finished trial)."""
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)  # a no-op for storages without heartbeats
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.number in before:
                parent.kill_trial_run(t.user_attrs.get("mlflow_run_id"),
                                      f"stale: its sweep sent no heartbeat for {self.grace_period} s (killed?)")
                log.warning("trial %d was left RUNNING by a stopped sweep: marked FAIL", t.number)

    def _finish(self, study: optuna.Study, parent: tracking.StudyRun) -> None:
        counts = {s.name: _count(study, (s,)) for s in FINISHED}
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not complete:
            reasons = sorted({str(t.user_attrs.get("fail_reason", "?")) for t in study.trials
                              if t.state == TrialState.FAIL})
            summary = (f"Sweep failed: none of the {len(study.trials)} trials of study '{study.study_name}' completed "
                       f"({counts['FAIL']} failed, {counts['PRUNED']} pruned). Reasons: {'; '.join(reasons)[:2000]}. "
                       f"Each trial's MLflow run holds its failure_reason tag; fix the cause and rerun the same "
                       f"command: the study keeps these trials and adds new ones up to n_trials.")
            parent.finish(None, self.config, failed=summary)
            log.error(summary)
            raise SystemExit(1)
        results: dict[str, Any]
        if len(self._get_directions()) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value,
                       "best_trial": best.number, "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
                       "trials": counts}
            log.info("Best trial %d: value %s, params %s (MLflow run %s)", best.number, best.value, best.params,
                     best.user_attrs.get("mlflow_run_id"))
        else:
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                       for t in study.best_trials], "trials": counts}
        path = f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # a rerun with nothing left to do launches no job
        OmegaConf.save(OmegaConf.create(results), path)
        log.info("Trials: %s; results in %s", counts, path)
        parent.finish(results, self.config, results_file=path)


def _attrs(study: optuna.Study, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's user attrs as stored now (Trial.user_attrs is a cache from when it was asked)."""
    return next(t.user_attrs for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _close(study: optuna.Study, trial: optuna.Trial, state: TrialState, reason: str | None) -> None:
    if reason:
        trial.set_user_attr("fail_reason", reason[:5000])
        log.warning("trial %d %s: %s", trial.number, state.name, reason)
    _tell(study, trial, state, None)


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None) -> None:
    try:
        study.tell(trial, state=state, values=values)
    except RuntimeError as exc:
        # GridSampler calls study.stop() once its grid is used up, which only works inside optimize();
        # Optuna has stored the trial's state by then (in a finally), so the tell itself is done.
        if "Study.stop" not in str(exc):
            raise


@contextmanager
def _heartbeat(storage: Any, trials: list[optuna.Trial], interval: int) -> Iterator[None]:
    """Beat for the trials in flight while their jobs run, so another sweep sees they are alive."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for t in trials:
                try:
                    storage.record_heartbeat(t._trial_id)  # noqa: SLF001 (Trial exposes no public id)
                except Exception:  # a missed beat is harmless; the next one comes in `interval`
                    pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name="optuna-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Pruned(Exception):
    """Raised in a job when its trial's pruner says stop, after `epoch` with objective `value`."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.value = epoch, value


class JobTrial:
    """A job's handle on its own Optuna trial (the job runs apart from the sweeper, maybe in a worker
    process): report each epoch's objective for pruning, leave run ids and failure reasons for the sweeper."""

    def __init__(self, study: str, storage: str, number: int, pruner: Any = None) -> None:
        pruner_obj = (instantiate(pruner, _execution_whitelist_=("optuna.pruners.*",)) if pruner
                      else optuna.pruners.NopPruner())
        if storage.startswith("sqlite"):
            storage = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
        self.study = optuna.load_study(study_name=study, storage=storage, pruner=pruner_obj)
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)  # noqa: SLF001 (no public number->id)
        self.number = number

    def set(self, **attrs: Any) -> None:
        for key, value in attrs.items():
            self.trial.set_user_attr(key, value)

    def should_prune(self, value: float, epoch: int) -> bool:
        self.trial.report(value, epoch)
        return self.trial.should_prune()
