"""The official Hydra Optuna sweeper, extended for long sweeps: resume, pruning, failures as data, and
exact bookkeeping across any number of sweep processes.

Why a subclass and not the plugin as is: hydra-optuna-sweeper 1.4.0rc3 asks and tells trials in the
sweeping process, so (1) a job never sees its trial and cannot report epochs for pruning, (2) a rerun adds
n_trials more instead of finishing the study, (3) trials of a killed sweep stay RUNNING forever (Optuna's
heartbeat only runs inside study.optimize), (4) a NaN return or a raising job can abort the sweep,
(5) a seeded sampler proposes the same points in every process that opens the study, and (6) it launches
n_jobs trials as a batch and waits for the slowest before asking more; here trials are asynchronous: a
trial's job is a batch of one, up to n_jobs training, and each finished trial frees its slot at once. This keeps the
official search-space parsing, samplers, config schema and launcher hand-off, and replaces only
`sweep()`; choose it with `hydra/sweeper=resnet_optuna` (the default in conf/config.yaml).

How job, trial and run find each other: the sweeper passes `sweep.study` and `sweep.trial` to each job
as config values and names its folder after the trial number; the job stores its MLflow run id in the
trial's user attrs (`mlflow_run_id`), tags the run with the study, trial number and job folder, and tells
the trial its result (resnet_sweep/trials.py).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import optuna
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import FrozenTrial, TrialState

from resnet_sweep import faults, stores, tracking, trials, workers
from resnet_sweep import space as space_check
from resnet_sweep.config import ConfigError, validate
from resnet_sweep.errors import UserError, exit_with
from resnet_sweep.trials import counted
from resnet_sweep.workers import SWEEPER_PID_ENV, Terminated, install_sigterm_handler

log = logging.getLogger(__name__)
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
# Launchers whose jobs run in worker processes that are children of the sweeping process: those jobs end
# with the sweep (resnet_sweep/workers.py). Submitit's jobs (SLURM, local) outlive it: they report to the
# study themselves.
LOCAL_WORKERS = ("JoblibLauncher",)
MAX_STUDY_NAME = 512  # Optuna's column for study names (MAX_INDEXED_STRING_LENGTH)
WORKER_DIED = ("TerminatedWorkerError", "BrokenProcessPool")  # what joblib's loky raises when a worker dies
JOB_LOST = ("UncompletedJobError", "FailedJobError")  # what submitit raises for a job that left no result
CLUSTER_LAUNCHERS = ("SlurmLauncher", "LocalLauncher")  # hydra-submitit-launcher's
# Trials launched beyond the n_jobs that train, waiting in joblib's worker pool (loky's queue): a worker
# that ends a trial starts the next within ~0.03 s. Without it the worker waited ~0.1 s a trial (more on a
# busy machine) while this process settled the result, asked the next trial and dispatched it (Hydra's
# joblib launcher deep-copies and pickles its global state per launch). One is enough unless workers end
# within that time of each other.
QUEUED_AHEAD = 1
SPACES = "search_spaces"  # study user attr: each search space and command that ran in the study, in order


@dataclass
class ResnetOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "resnet_sweep.sweeper.ResnetOptunaSweeper"
    # An optuna.pruners class as an instantiate config; conf/pruner/ holds none, median, ... presets.
    pruner: Optional[Any] = None
    # RDB storages get Optuna's heartbeat: a RUNNING trial silent for grace_period seconds belonged to a
    # process that died; the next sweep of the study marks it interrupted and runs its parameters again.
    heartbeat_interval: int = 5
    grace_period: int = 20
    # Stop the sweep once more than this share of its counted trials failed (1.0: never; interruptions
    # are not failures). The official sweeper's 0.0 would end a sweep at its first diverged trial.
    max_failure_rate: float = 1.0
    # Seconds: no trial starts after this much of the sweep (those running finish), as Optuna's optimize().
    timeout: Optional[float] = None
    # Seconds a trial may train; one that runs longer fails (and counts), as its own fault.
    trial_timeout: Optional[float] = None
    # Seconds without a training step after which a trial is stopped and retried (null: adaptive, see
    # trials.STALL_FACTOR); parameters that stall 3 times fail.
    stall_timeout: Optional[float] = None
    # Resume a study whose search space differs from this command's, on purpose (else refused).
    allow_space_change: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="resnet_optuna", node=ResnetOptunaSweeperConf,
                             provider="resnet_sweep")


class ResnetOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None, params: DictConfig | None,
                 pruner: Any = None, heartbeat_interval: int = 5, grace_period: int = 20, timeout: float | None = None,
                 trial_timeout: float | None = None, stall_timeout: float | None = None,
                 allow_space_change: bool = False, **unknown: Any) -> None:
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs}: the sweeper keeps n_jobs trials in flight, so it must "
                             f"be >= 1 (with workers=joblib it follows hydra.launcher.n_jobs)")
        self.impl = _Impl(instantiate(sampler, _execution_whitelist_=SAMPLERS), direction, storage, study_name,
                          n_trials, n_jobs, max_failure_rate, custom_search_space, params)
        self.impl.sampler_config = sampler
        self.impl.pruner = (instantiate(pruner, _execution_whitelist_=("optuna.pruners.*",)) if pruner
                            else optuna.pruners.NopPruner())
        self.impl.heartbeat_interval, self.impl.grace_period = heartbeat_interval, grace_period
        self.impl.limits = {"timeout": timeout, "trial_timeout": trial_timeout, "stall_timeout": stall_timeout}
        self.impl.allow_space_change, self.impl.unknown = allow_space_change, unknown

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.impl.sweep(arguments)


class SeedPerTrial(optuna.samplers.BaseSampler):
    """A sampler reseeded from (seed, trial number) before each trial.

    Why: a sampler seeded once replays the same proposals in every process that opens the study (a
    rerun, a second sweep of a team's study, another machine), so their trials duplicate each other.
    Trial numbers are unique in a study, so each process gets its own proposals, while one
    uninterrupted seeded sweep stays reproducible. Samplers keep their state in the study, not in the
    object, so a fresh one per trial loses nothing.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self.sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler = self._make(int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any) -> Any:
        return self.sampler.sample_independent(study, trial, name, distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class _Impl(OptunaSweeperImpl):
    pruner: optuna.pruners.BasePruner
    sampler_config: Any
    heartbeat_interval: int
    grace_period: int
    limits: dict[str, float | None]  # timeout, trial_timeout, stall_timeout
    allow_space_change: bool
    unknown: dict[str, Any]  # settings the sweeper does not take (refused in _check)

    def _sampler_settings(self) -> dict[str, Any]:
        cfg = OmegaConf.to_container(self.sampler_config, resolve=True) if self.sampler_config else {}
        # TPE proposes while other trials run: with constant_liar it counts them as bad results (worst
        # value so far), so it does not propose their neighbourhood again before they end. On unless the
        # command line sets hydra.sweeper.sampler.constant_liar.
        if (str(cfg.get("_target_", "")).endswith("TPESampler") and self._capacity() > 1 and not any(
                o.split("=")[0].lstrip("+~") == "hydra.sweeper.sampler.constant_liar"
                for o in self.config.hydra.overrides.hydra)):
            cfg["constant_liar"] = True
        return cfg

    def _capacity(self) -> int:
        """Trials in flight at most: n_jobs training, and with joblib's worker processes QUEUED_AHEAD waiting.
        (joblib with n_jobs=1 starts no worker process: it runs each job in the calling thread.)"""
        return self.n_jobs + (QUEUED_AHEAD if self._worker_processes() else 0)

    def _worker_processes(self) -> bool:
        """Whether the launcher runs jobs in a pool of worker processes of this process (joblib's loky)."""
        return type(self.launcher).__name__ in LOCAL_WORKERS and self.launcher.joblib.get("n_jobs") != 1

    def _make_sampler(self, space: dict[str, Any]) -> optuna.samplers.BaseSampler:
        cfg = self._sampler_settings()
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            # One grid sampler as configured, never reseeded: its seed shuffles the grid, so every process
            # must share it to agree on which cell a grid_id is. Asking under a lock (see _run) gives
            # each cell to one trial.
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            return self.sampler(grid)
        if cfg.get("seed") is None:
            return self.sampler
        return SeedPerTrial(lambda s: instantiate({**cfg, "seed": s}, _execution_whitelist_=SAMPLERS), cfg["seed"])

    def sweep(self, arguments: list[str]) -> None:
        install_sigterm_handler()
        tracking.mask_passwords_in_logs()
        self._begun = time.monotonic()  # hydra.sweeper.timeout counts from here
        try:  # before any study, run or trial exists
            space, fixed, fixed_overrides = self._space(arguments)
            self._check(space, fixed, fixed_overrides)
        except UserError as exc:
            exit_with(exc)
        sampler = self._make_sampler(space)
        self.parent: tracking.StudyRun | None = None
        self._mlflow_down = False
        if type(self.launcher).__name__ in LOCAL_WORKERS:
            os.environ[SWEEPER_PID_ENV] = str(os.getpid())  # before any worker starts: workers watch this process
        try:
            # one process at a time creates the schema, the study and a fresh MLflow database
            with stores.store_lock(str(self.storage)):
                storage = trials.open_storage(self.storage, self.heartbeat_interval, self.grace_period, self._stale)
                study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                            pruner=self.pruner, directions=self._get_directions(), load_if_exists=True)
                spaces = self._same_space(study, space)  # refused before anything is written
                study.set_user_attr(SPACES, spaces)
                log.info("Study %s in %s: %d trials finished of n_trials=%d", study.study_name,
                         tracking.safe_url(str(self.storage)), len(counted(study.trials)), self.n_trials)
                warm = self._warm_workers() if len(counted(study.trials)) < self.n_trials else None
                if (t := self.config.tracking).enabled:  # a fresh MLflow database is made while workers warm up
                    tracking.prepare_store(t.uri, t.experiment, t.artifact_location)
                    tracking.close_dead_runs(t.uri)
            if warm is not None:
                warm()
        except UserError as exc:  # before any trial or run exists
            self._stop_workers()
            exit_with(exc)
        except (KeyboardInterrupt, Terminated) as exc:  # before any trial or run exists: nothing to mark
            self._stop_workers()
            log.error("Sweep interrupted (%s: %s) before any trial started; run the same command again to start "
                      "it.", type(exc).__name__, exc)
            raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 143) from None  # 128 + SIGINT/SIGTERM
        except BaseException as exc:
            self._stop_workers()  # workers that started would keep this process ~6 s finishing their imports
            self._environment_stop(exc, None)
            raise
        self._started, self._done_here = time.monotonic(), 0  # for the progress lines' time left
        self._objective = getattr(self.config.get("objective"), "name", self.config.get("objective", "objective"))
        study_name = study.study_name
        try:
            # the parent run starts when the workers can train (one process at a time: one parent run per study)
            with stores.store_lock(str(self.storage)):
                history = [(h["command"], space_check.describe(h["space"])) for h in spaces]
                self.parent = parent = tracking.StudyRun(self.config, study, self._sampler_settings(), self.pruner,
                                                         space, history)
                parent.close_orphans(study.trials)
            self._run(study, storage, space, fixed, fixed_overrides)
            # nothing is in flight: stop the workers now rather than at exit, where each spent ~3 s tearing
            # down its interpreter (torch, MLflow) while the command seemed done
            self._stop_workers()
            self._finish(study, parent)
        except SystemExit:
            raise  # the failure summary has ended the parent run
        except (KeyboardInterrupt, Terminated) as exc:
            if self.parent is not None:
                self.parent.end("KILLED", f"interrupted: {type(exc).__name__}: {exc}")
            log.error("Sweep interrupted (%s: %s). Trials in flight are marked interrupted; run the same command "
                      "again to finish study '%s'.", type(exc).__name__, exc, study_name)
            raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 143) from None  # 128 + SIGINT/SIGTERM
        except BaseException as exc:
            self._environment_stop(exc, study_name)
            if self.parent is not None:
                self.parent.end("FAILED", f"{type(exc).__name__}: {exc}")
            raise

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The search space (name -> Optuna distribution), the fixed values and the deletions of the command
        and of hydra.sweeper.params; ConfigError for a sweep Optuna cannot take (a log interval from 0)."""
        self._process_searchspace_config()
        written = self._parse_sweeper_params_config() + list(arguments)
        try:
            space, fixed, fixed_overrides = create_params_from_overrides(written)
        except ValueError:
            for override in written:  # which one
                try:
                    create_params_from_overrides([override])
                except ValueError as exc:
                    raise ConfigError(f"{override} cannot be swept: {exc} (e.g. a log interval starts above 0: "
                                      f"'optimizer.lr=tag(log,interval(1e-4,1))')") from None
            raise
        for name in fixed:
            space.pop(name, None)
        self._written = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in written if "=" in o}
        return space, fixed, fixed_overrides

    def _same_space(self, study: optuna.Study, space: dict[str, Any]) -> list[dict[str, Any]]:
        """The spaces and commands that ran in the study, this one added; ConfigError if this command's space
        differs from the study's last one, unless hydra.sweeper.allow_space_change=true (a categorical's
        choices can never change: Optuna keeps one set per parameter)."""
        command = tracking.sweep_command(self.config)
        now = {name: optuna.distributions.distribution_to_json(d) for name, d in space.items()}
        history = list(study.user_attrs.get(SPACES, []))
        seen = {name: optuna.distributions.distribution_to_json(d) for t in study.trials
                for name, d in t.distributions.items()}
        if not history and seen:  # a study made before spaces were recorded: its trials tell
            history = [{"space": seen, "command": "?"}]
        last = history[-1]["space"] if history else now
        if last != now:
            changes = space_check.changes(last, now)
            for name, old in last.items():
                if name in now and not space_check.compatible(old, now[name]):
                    raise ConfigError(f"study '{study.study_name}' sweeps {name}={space_check.short(old)}; this "
                                      f"command gives {name}={space_check.short(now[name])}, which Optuna cannot put "
                                      f"in the same study (a choice's values, or a value's kind, never change in "
                                      f"one). Start a new study: add hydra.sweeper.study_name={study.study_name}-2")
            if not self.allow_space_change:
                raise ConfigError(f"study '{study.study_name}' was swept over another search space ({changes}). "
                                  f"Start a new study (add hydra.sweeper.study_name={study.study_name}-2), or add "
                                  f"hydra.sweeper.allow_space_change=true to go on in this one with the new space")
        if not history or history[-1] != {"space": now, "command": command}:
            history.append({"space": now, "command": command})
        return history

    def _environment_stop(self, exc: BaseException, study_name: str | None) -> None:
        """If `exc` is a fault of the environment (faults.py): end the parent run KILLED where the store lets
        it, print one paragraph naming the resource and the fix, and exit (75, or 2 for a damaged store)."""
        fault = faults.classify(exc)
        if fault is None:
            return
        t = self.config.tracking
        if fault.kind == "damaged store":  # name the file, as the check before a sweep does
            try:
                stores.check_store(str(self.storage), "hydra.sweeper.storage")
                if t.enabled:
                    stores.check_store(t.uri, "tracking.uri")
            except UserError as damaged:
                exit_with(damaged)
        if self.parent is not None:
            if not tracking.answers(t.uri):
                log.warning("MLflow's server does not answer: the study's run %s is closed by the next sweep of it",
                            self.parent.run_id)
            else:
                self.parent.end("KILLED", f"interrupted: {fault}")
        resources = {}
        if fault.store != "tracking":
            resources["hydra.sweeper.storage"] = tracking.safe_url(str(self.storage))
        if t.enabled and fault.store != "study":
            resources["tracking.uri"] = tracking.safe_url(t.uri)
        if fault.kind in ("disk full", "input/output error"):
            resources = {k: str(stores.sqlite_file(v) or v) for k, v in resources.items()}
            resources.update({"hydra.sweep.dir": str(self.config.hydra.sweep.dir)} |
                             ({"tracking.artifact_location": str(t.artifact_location)} if t.enabled else {}))
        then = (f"run the same command again: study '{study_name}' goes on where it stopped (its trials in "
                f"flight were interrupted: they are run again, not counted)" if study_name else
                "run the same command again")
        print(f"Error: sweep stopped by a fault of the environment, {faults.paragraph(fault, resources, then)}",
              file=sys.stderr)
        raise SystemExit(2 if fault.kind == "damaged store" else faults.EXIT_CODE)

    def _check(self, space: dict[str, Any], fixed: dict[str, Any], fixed_overrides: list[str]) -> None:
        """What the sweep's command gets wrong, found before anything is created: the sweeper's settings, the
        config as the jobs will see it (less the swept values), every value the search space can give, the
        objective, the names, the stores."""
        if self.unknown:
            raise ConfigError(f"hydra.sweeper.{sorted(self.unknown)[0]} is not a setting of the sweeper; it takes "
                              f"{', '.join(f.name for f in fields(ResnetOptunaSweeperConf) if not f.name.startswith('_'))}")
        for key, value in self.limits.items():
            if value is not None and not value > 0:
                raise ConfigError(f"hydra.sweeper.{key}={value}: give a number of seconds > 0, or null for none")
        if self.launcher.__class__.__name__ == "JoblibLauncher" and self.launcher.joblib.get("timeout") is not None:
            raise ConfigError(f"hydra.launcher.timeout={self.launcher.joblib.get('timeout')} is joblib's: when one "
                              f"trial passes it, joblib stops every worker, and the sweep with them. For a time limit "
                              f"per trial use hydra.sweeper.trial_timeout=SECONDS, for the whole sweep "
                              f"hydra.sweeper.timeout=SECONDS")
        job_config = self.config.copy()
        with open_dict(job_config):
            del job_config["hydra"]
        conf = validate(job_config, sweep_direction=self.direction)
        if conf.objective.name.startswith("test_"):
            raise ConfigError(f"objective={conf.objective.name}: a sweep must not choose hyperparameters on the test "
                              f"set, or the test accuracy of its best trial is no longer an unbiased estimate. Sweep "
                              f"on objective=val_acc (or val_loss with hydra.sweeper.direction=minimize); every run "
                              f"still records test_acc and test_loss")
        if len(str(self.study_name)) > MAX_STUDY_NAME:
            raise ConfigError(f"hydra.sweeper.study_name is {len(str(self.study_name))} characters long; Optuna keeps "
                              f"at most {MAX_STUDY_NAME}: choose a shorter one (or a shorter tracking.experiment, "
                              f"which the default study name starts with)")
        stores.check_store(str(self.storage), "hydra.sweeper.storage")
        if conf.tracking.enabled:
            stores.check_store(conf.tracking.uri, "tracking.uri")
        if type(self.launcher).__name__ == "JoblibLauncher":  # as the launcher checks at its first launch
            from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg

            try:
                process_joblib_cfg(dict(self.launcher.joblib))
            except ValueError as exc:
                raise ConfigError(f"hydra.launcher: {exc}") from None
        overrides = [f"{name}={value}" for name, value in fixed.items()] + list(fixed_overrides)
        space_check.check(space, self._written, overrides,
                          lambda o: self.hydra_context.config_loader.load_sweep_config(self.config, o))

    def _warm_workers(self) -> Callable[[], None] | None:
        """Start joblib's worker processes now and have each import what a job needs (workers.warm_up, ~6 s
        a worker on 2 cores) while this process opens the stores; returns a wait() for them, or None for
        other launchers. Hydra's joblib launcher starts its workers at the first launch, so every worker
        paid its imports inside the first trial (measured: 6.2 s from launch to the first training step).
        Our own because the launcher offers no start-up hook; it mirrors the Parallel arguments of its
        launch() (hydra_joblib_launcher._core), so that loky reuses these very workers for the trials."""
        if not self._worker_processes():
            return None
        from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        from joblib import Parallel, delayed

        parallel_cfg = dict(self.launcher.joblib)
        process_joblib_cfg(parallel_cfg)  # as the launcher does (checked in _check)
        if parallel_cfg.get("backend") != "loky" or parallel_cfg.pop("inner_max_num_threads", None) is not None:
            return None  # a pool set up otherwise than ours: leave it to the launcher
        done, failed = threading.Event(), []

        def start() -> None:
            try:
                Parallel(**parallel_cfg)(delayed(workers.warm_up)() for _ in range(self.n_jobs))
            except BaseException as exc:  # noqa: BLE001 (the first trial meets the same problem and reports it)
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=start, name="warm-workers", daemon=True).start()
        log.info("starting %d worker processes (each imports torch, MLflow, Optuna: a few seconds)", self.n_jobs)

        def wait() -> None:
            while not done.wait(0.5):  # in slices: Ctrl-C and SIGTERM reach this thread while it waits
                pass
            if failed:
                log.warning("starting the workers failed (%s: %s); trials start them again",
                            type(failed[0]).__name__, failed[0])

        return wait

    def _run(self, study: optuna.Study, storage: Any, space: dict[str, Any], fixed: dict[str, Any],
             fixed_overrides: list[str]) -> None:
        """Keep up to n_jobs trials training (and QUEUED_AHEAD waiting for a joblib worker) until the study
        holds n_trials counted ones, or hydra.sweeper.timeout has passed and nothing is in flight.
        Asynchronous: as soon as one trial finishes, its result is settled and the next is asked and
        launched, so a slow trial never holds the other workers. Waits while other processes' trials run
        (they may finish the study, or die and be retried here)."""
        self._in_flight: dict[int, optuna.Trial] = {}
        self._ended_at: dict[int, float] = {}  # when a trial in flight was first seen ended (_release_ended)
        self._found_stale: set[int] = set()  # trials that fail_stale_trials failed here (see _stale)
        self._pool_broken_for: int | None = None  # the trial whose stuck worker this process killed
        self._timed_out = False
        finished: queue.Queue = queue.Queue()  # (trial number, JobReturn or None, exception or None)
        stop_beat = trials.beat(storage, lambda: self._unstarted(storage), self.heartbeat_interval)
        said_waiting = False
        try:
            while True:
                # under the lock, so that processes of one study neither queue a retry twice nor together ask
                # for more trials than n_trials leaves
                with stores.store_lock(str(self.storage)):
                    optuna.storages.fail_stale_trials(study)  # a no-op for storages without heartbeats
                    trials.queue_retries(study)
                    all_trials = study.get_trials(deepcopy=False)
                    done = counted(all_trials)
                    timeout = self.limits["timeout"]
                    self._timed_out = bool(timeout) and time.monotonic() - self._begun >= timeout
                    if (len(done) >= self.n_trials or self._timed_out) and not self._in_flight:
                        return
                    self._check_failure_rate(study, done)
                    running = [t for t in all_trials if t.state == TrialState.RUNNING]
                    slots = min(self._capacity() - len(self._in_flight), self.n_trials - len(done) - len(running))
                    if any(t.state == TrialState.WAITING and trials.WORKER_DEATHS in t.system_attrs
                           for t in all_trials):  # a trial whose worker died beside another's runs alone
                        slots = min(slots, 0 if self._in_flight else 1)
                    batch = self._ask(study, storage, 0 if self._timed_out else slots)
                for number in sorted(self._found_stale & set(self._in_flight)):
                    self._stop_job(study, number)
                self._found_stale.clear()
                for trial in batch:
                    self._start(trial, space, fixed, fixed_overrides, finished)
                if self._in_flight:
                    said_waiting = False
                    self._collect(study, finished)
                    continue
                if not isinstance(storage, optuna.storages.RDBStorage):
                    return  # no heartbeats: a dead process's RUNNING trial could never be told from a live one
                if not said_waiting:
                    said_waiting = True
                    log.info("waiting for %d trials that other processes run (%s)", len(running),
                             ", ".join(str(t.number) for t in running))
                time.sleep(self.heartbeat_interval)
        except BaseException as exc:  # SIGTERM, Ctrl-C, a launcher error: close what is in flight, then go
            self._stop_workers()
            for number in list(self._in_flight):
                try:
                    self._interrupt(study, number, f"interrupted: sweep stopped by {type(exc).__name__}: {exc}")
                except Exception as error:  # noqa: BLE001 (the store may be why it stopped: a rerun finds it silent)
                    log.warning("trial %d: could not mark it interrupted (%s)", number, error)
            raise
        finally:
            stop_beat()

    def _stop_job(self, study: optuna.Study, number: int) -> None:
        """A trial in flight was found stale (its job made no progress, or died without a word): stop its job,
        if it still runs, and free its slot. A joblib worker of this process is killed (loky then restarts
        its pool, and the trials beside it are interrupted: see _collect); a SLURM job is cancelled."""
        self._in_flight.pop(number, None)
        job = trials.find(study, number).user_attrs.get(trials.PROCESS) or {}
        pid = int(job.get("pid") or 0)
        if job.get("slurm"):
            subprocess.run(["scancel", str(job["slurm"])], capture_output=True, timeout=60)
            log.warning("trial %d: its SLURM job %s was cancelled; its slot is free", number, job["slurm"])
        elif job.get("host") == socket.gethostname() and pid and pid != os.getpid() and _parent_of(pid) == os.getpid():
            self._pool_broken_for = number
            os.kill(pid, signal.SIGKILL)  # a stopped (SIGSTOP) or stuck process too
            log.warning("trial %d: its worker process %d was killed; its slot is free", number, pid)
        else:
            log.warning("trial %d: its job (%s) cannot be stopped from here; its slot is free", number,
                        job or "not started")

    def _unstarted(self, storage: Any) -> list[int]:
        """Ids of the trials in flight whose jobs have not started (e.g. queued on a cluster): this process
        beats for them. A started job beats for its own trial, so that a job which dies without a word
        (node failure, scancel) is found by its silence, whatever becomes of this process."""
        ids = [t._trial_id for t in list(self._in_flight.values())]  # noqa: SLF001 (Trial exposes no public id)
        return [i for i in ids if trials.JOB not in storage.get_trial(i).user_attrs]

    @staticmethod
    def _ask(study: optuna.Study, storage: Any, slots: int) -> list[optuna.Trial]:
        """Ask `slots` trials (retries first: ask() takes WAITING ones), with a first heartbeat at once: a
        trial asked by a process that dies before its job starts goes stale and is retried."""
        batch = [study.ask() for _ in range(max(slots, 0))]
        if isinstance(storage, optuna.storages.RDBStorage):
            for t in batch:
                storage.record_heartbeat(t._trial_id)  # noqa: SLF001 (Trial exposes no public id)
        return batch

    def _start(self, trial: optuna.Trial, space: dict[str, Any], fixed: dict[str, Any], fixed_overrides: list[str],
               finished: queue.Queue) -> None:
        """Launch one trial's job through the configured launcher, as a batch of one. With one job at a time,
        or Hydra's basic launcher (jobs in this process, which set signal handlers), in this thread; else in
        a thread of its own that waits for the job while the launcher runs it elsewhere (joblib's reused
        worker processes, SLURM): the launcher API is one blocking call per batch, and this is the smallest
        way to let trials end one by one."""
        (overrides,) = self._configure_trials([trial], space, fixed, fixed_overrides)
        parent = getattr(self.parent, "run_id", None)  # its trials' runs become its children
        overrides = [(*overrides, _override("sweep.study", trial.study.study_name), f"sweep.trial={trial.number}",
                      *([_override("sweep.parent_run", parent)] if parent else []),
                      f"hydra.sweep.subdir={trial.number}")]  # job folder = trial number: unique across processes
        self._in_flight[trial.number] = trial

        def job() -> JobReturn:
            return self.launcher.launch(overrides, initial_job_idx=trial.number)[0]

        def in_thread() -> None:
            try:
                finished.put((trial.number, job(), None))
            except BaseException as exc:  # noqa: BLE001 (handed to the sweeping thread, which decides)
                finished.put((trial.number, None, exc))

        if self._capacity() == 1 or type(self.launcher).__name__ == "BasicLauncher":
            finished.put((trial.number, job(), None))  # an exception here propagates to _run at once
        else:
            threading.Thread(target=in_thread, name=f"trial-{trial.number}", daemon=True).start()

    def _collect(self, study: optuna.Study, finished: queue.Queue) -> None:
        """Settle the trials that finished (waiting up to a heartbeat interval for one)."""
        try:
            results = [finished.get(timeout=self.heartbeat_interval)]
        except queue.Empty:
            self._release_ended(study)
            return
        while not finished.empty():
            results.append(finished.get_nowait())
        results = [r for r in results if r[0] in self._in_flight]  # a released trial's job, come back late
        if any(_worker_died(exc) for _, _, exc in results):
            # loky stops every worker of its pool when one dies: every trial in flight fails with it
            reported = {n for n, _, _ in results}
            while not set(self._in_flight) <= reported:
                n, ret, exc = finished.get(timeout=300)
                if n in self._in_flight:
                    results.append((n, ret, exc))
                    reported.add(n)
            died = [(n, exc) for n, _, exc in results if _worker_died(exc)]
            self._worker_died(study, [n for n, _ in died], died[0][1])
        for number, ret, exc in results:
            if exc is not None and not _worker_died(exc):
                self._job_raised(study, number, exc)  # may stop the sweep: the trial is still in flight then
            self._in_flight.pop(number, None)
            self._ended_at.pop(number, None)  # seen ended by _release_ended before its job came back
            if exc is None:
                self._settle(study, number, ret)
            self._progress(study, number)
            fault = trials.find(study, number).user_attrs.get(trials.ENVIRONMENT)
            if fault:  # the job met a fault of the environment: the trials after it would too
                raise faults.EnvironmentStop(faults.Fault(**fault))

    def _job_raised(self, study: optuna.Study, number: int, exc: BaseException) -> None:
        """The launcher raised for trial `number`'s job (the job itself raised outside the task, or never
        ran): a cluster job lost (interrupted) or failed; a job stopped from outside (interrupted); a fault
        of the environment (interrupted, and the sweep stops); the trial's own config that does not compose
        (it fails alone). Anything else is the launcher's and stops the sweep."""
        if type(exc).__name__ in JOB_LOST:
            self._job_lost(study, number, exc)
        elif isinstance(exc, (Terminated, KeyboardInterrupt)):
            self._interrupt(study, number, f"interrupted: its job was stopped ({type(exc).__name__}: {exc})")
        elif (fault := faults.classify(exc)) is not None:
            self._interrupt(study, number, f"interrupted: {fault}", **{trials.ENVIRONMENT: fault.__dict__})
            raise faults.EnvironmentStop(fault) from exc
        elif isinstance(exc, (HydraException, OmegaConfBaseException, UserError)):
            reason = f"its config does not compose: {type(exc).__name__}: {' '.join(str(exc).split())[:1000]}"
            trials.end(study, number, TrialState.FAIL, reason=reason)
            self._kill_run(number, reason, status="FAILED")
            log.error("trial %d failed: %s", number, reason)
        else:
            raise exc  # a launcher error: the sweep stops (see _run)

    def _release_ended(self, study: optuna.Study) -> None:
        """Free the slot of a cluster job whose trial has ended while the launcher still waits for the job.
        Why: submitit waits for a job that SLURM preempted as if it were to be requeued, but ours are not
        (--no-requeue), and the job told its trial first (interrupted, to be retried). The waiting thread
        is left to itself; what it brings back later is ignored."""
        if type(self.launcher).__name__ not in CLUSTER_LAUNCHERS:
            return
        now, wait = time.monotonic(), max(30.0, 3.0 * self.heartbeat_interval)  # submitit usually answers first
        for number in list(self._in_flight):
            if trials.find(study, number).state == TrialState.RUNNING:
                continue
            ended = self._ended_at.setdefault(number, now)
            if now - ended >= wait:
                log.info("trial %d has ended, but its job has not come back in %.0f s: its slot is free", number, wait)
                self._in_flight.pop(number)
                del self._ended_at[number]
                self._progress(study, number)

    def _stop_workers(self) -> None:
        """Stop joblib's worker processes at once: when the sweep is interrupted, the threads waiting on them
        return and nothing trains on (in one blocking call, joblib did this itself); when it is done, the
        command ends without waiting for them to exit."""
        if type(self.launcher).__name__ == "JoblibLauncher":
            from joblib.externals.loky import reusable_executor

            executor = reusable_executor._executor  # noqa: SLF001 (loky's pool, reused across launches)
            if executor is not None:  # joblib's MemmappingExecutor: terminate also removes its temporary files
                executor.terminate(kill_workers=True)

    def _progress(self, study: optuna.Study, number: int) -> None:
        """One line per finished trial: its result, how far the study is, the best so far, time left."""
        all_trials = study.get_trials(deepcopy=False)
        trial = next(t for t in all_trials if t.number == number)
        done = counted(all_trials)
        self._done_here += 1
        states = ", ".join(f"{n} {s.name}" for s in trials.FINISHED if (n := sum(t.state == s for t in done)))
        elapsed = time.monotonic() - self._started
        left = max(self.n_trials - len(done), 0)
        eta = f", about {_duration(elapsed / self._done_here * left)} left" if left else ""
        result = trial.state.name if trial.value is None else f"{trial.state.name}, {self._objective} {trial.value:.4g}"
        if number in trials.interrupted(all_trials):  # (a retry's own history names the trial it retries)
            result = "interrupted (to run again)"
        best = ""
        if len(self._get_directions()) == 1 and any(t.state == TrialState.COMPLETE for t in all_trials):
            best = f" | best {study.best_trial.value:.4g} (trial {study.best_trial.number})"
        log.info("trial %d: %s | %d of %d trials done (%s)%s | %s elapsed%s", number, result, len(done),
                 self.n_trials, states or "none counted", best, _duration(elapsed), eta)

    def _settle(self, study: optuna.Study, number: int, ret: JobReturn) -> None:
        """A job's trial that its job left RUNNING (it failed before it could tell, or tells no result)."""
        if trials.find(study, number).state != TrialState.RUNNING:
            return  # the job told its result
        if ret.status == JobStatus.FAILED:
            error = ret._return_value  # the job's exception (hydra keeps it there)
            trials.end(study, number, TrialState.FAIL, reason=f"{type(error).__name__}: {error}")
            return
        value = ret.return_value
        if value is None or not math.isfinite(float(value)):
            trials.end(study, number, TrialState.FAIL, reason=f"objective was {value}")
        else:
            trials.end(study, number, TrialState.COMPLETE, [float(value)])

    def _job_lost(self, study: optuna.Study, number: int, exc: BaseException) -> None:
        """A cluster job (submitit) ended without a result: killed (scancel, preemption, a node lost) before
        its trial could say so, which makes the trial interrupted and retried; or it raised outside the
        task (its trial fails with the reason). A job that told its trial's end first leaves nothing to do."""
        if trials.find(study, number).state != TrialState.RUNNING:
            return
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else ''}"
        if type(exc).__name__ == "UncompletedJobError":
            self._interrupt(study, number, f"interrupted: its job ended without a result ({error})")
        else:
            trials.end(study, number, TrialState.FAIL, reason=f"its job failed ({error})")
            self._kill_run(number, f"its job failed ({error})", status="FAILED")

    def _worker_died(self, study: optuna.Study, numbers: list[int], exc: BaseException) -> None:
        """The launcher raised: a worker process died (killed by the kernel: out of memory? or by this sweep,
        to stop a stuck trial). loky then SIGKILLs every other worker of its pool, so with several trials in
        flight the victim is unknown: those trials are retried, each alone (see _run), and a trial whose
        worker dies alone has failed. Where this sweep killed the worker, the others are simply retried."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        left = [n for n in numbers if trials.find(study, n).state == TrialState.RUNNING]
        stopped, self._pool_broken_for = self._pool_broken_for, None
        for number in left:
            if stopped is not None:
                self._interrupt(study, number, f"interrupted: its worker pool was restarted to stop trial {stopped}, "
                                               f"which made no progress")
            elif len(left) == 1:
                trials.end(study, number, TrialState.FAIL, reason=f"its worker process died ({error})")
                self._kill_run(number, f"its worker process died ({error})", status="FAILED")
            else:
                self._interrupt(study, number, f"interrupted: a worker process died beside it ({error})",
                                **{trials.WORKER_DEATHS: True})  # its retry runs alone
        if stopped is None:
            log.error("A worker process died (%s); the sweep goes on with fresh workers", error)

    def _interrupt(self, study: optuna.Study, number: int, reason: str, **attrs: Any) -> None:
        if trials.end(study, number, TrialState.FAIL, reason=reason, interrupted=True, **attrs):
            log.warning("trial %d %s; its parameters will run again", number, reason)
        self._kill_run(number, reason)

    def _kill_run(self, number: int, reason: str, status: str = "KILLED") -> None:
        """End trial `number`'s runs `status`; not with a tracking server that does not answer (each request
        would wait out MLflow's retries, minutes): the next sweep of the study closes them (close_orphans)."""
        if self.parent is not None and tracking.answers(self.config.tracking.uri):
            self.parent.end_trial_runs(number, reason, status)

    def _stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's fail_stale_trials failed this RUNNING trial (no heartbeat for grace_period s): its process
        died or stopped, or its job made no progress (it stops beating then: trials.JobTrial). Queue its
        parameters again (unless they stalled too often: then the trial counts, FAIL), end its MLflow run
        KILLED, and have _run stop its job if it is one of this process's."""
        stalled = trial.user_attrs.get(trials.STALLED)
        reason = str(trial.user_attrs.get("fail_reason") if stalled else
                     f"interrupted: no heartbeat for {self.grace_period} s (its process died or stopped)")
        if stalled and trial.system_attrs.get(trials.STALLS, 0) >= trials.STALL_RETRIES:
            self._kill_run(trial.number, reason, status="FAILED")
            log.error("trial %d made no progress, as it did twice before: it counts as failed", trial.number)
        else:
            trials.retry(study, trial, reason)  # fail_stale_trials runs under the store lock: queued once
            self._kill_run(trial.number, reason)
            log.warning("trial %d: %s; its parameters will run again", trial.number, reason)
        self._found_stale.add(trial.number)

    def _check_failure_rate(self, study: optuna.Study, done: list[FrozenTrial]) -> None:
        failed = [t for t in done if t.state == TrialState.FAIL]
        if done and len(failed) / len(done) > self.max_failure_rate:
            self._fail(study, f"{len(failed)} of its {len(done)} finished trials failed, more than "
                              f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")

    def _fail(self, study: optuna.Study, why: str) -> None:
        """End the sweep with a one-paragraph summary and exit code 1."""
        reasons = sorted({str(t.user_attrs.get("fail_reason", "?")) for t in counted(study.trials)
                          if t.state == TrialState.FAIL})
        summary = (f"Sweep failed: {why} (study '{study.study_name}'). Reasons: {'; '.join(reasons)[:2000]}. "
                   f"Each trial's MLflow run holds its failure_reason tag. Rerunning the same command adds "
                   f"no trials to this study: once the cause is fixed, start a new study, e.g. by adding "
                   f"hydra.sweeper.study_name={study.study_name}-2 to the command.")
        assert self.parent is not None
        self.parent.finish(None, self.config, failed=summary)
        log.error(summary)
        raise SystemExit(1)

    def _finish(self, study: optuna.Study, parent: tracking.StudyRun) -> None:
        done = counted(study.trials)
        counts = {s.name: sum(t.state == s for t in done) for s in trials.FINISHED}
        counts["INTERRUPTED"] = len(trials.interrupted(study.trials))
        if self._timed_out and len(done) < self.n_trials:
            log.warning("hydra.sweeper.timeout=%g s has passed: no trial started after it; %d of %d trials done. Run "
                        "the same command again to go on with study '%s'.", self.limits["timeout"], len(done),
                        self.n_trials, study.study_name)
            if not any(t.state == TrialState.COMPLETE for t in done):
                parent.finish(None, self.config, failed=None)
                return
        if not any(t.state == TrialState.COMPLETE for t in done):
            self._fail(study, f"none of its {len(done)} trials completed ({counts['FAIL']} failed, "
                              f"{counts['PRUNED']} pruned)")
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


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _override(key: str, value: str) -> str:
    """`key='value'` quoted for Hydra's override grammar, so any study name (non-ASCII, `/`, `,`, quotes,
    `${`) reaches the job as it is. In a quoted value, backslashes are escaped only before a quote or at
    the end, and `\\${` keeps OmegaConf from reading an interpolation."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"{key}='{escaped}'"


def _parent_of(pid: int) -> int:
    """The parent process of `pid` (0 if gone or unknown): the sweep only kills its own workers."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _worker_died(exc: BaseException | None) -> bool:
    return exc is not None and type(exc).__name__ in WORKER_DIED
