"""Optuna studies through Hydra's Sweeper interface: trials asked in the sweeping process and launched one
job each through the configured Hydra launcher, up to n_jobs at once, each settled as soon as it ends.

Built on public interfaces: Hydra's Sweeper and Launcher plugins, the official Optuna sweeper's config
schema and sampler presets (hydra_plugins.hydra_optuna_sweeper.config), Optuna's ask, tell, storage and
heartbeats. What a long sweep needs beyond the official sweeper's one batch at a time: each job tells
its own trial (trials.py), so a result survives the sweeping process; a rerun finishes the study; a
trial stopped from outside or by the environment is retried, never counted; every value of the search
space is checked first (preflight.py); every sweep ends (stalls, time limits: docs/sweeps.md). Choose it with
`hydra/sweeper=resnet_optuna` (the default in conf/config.yaml).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import TrialState

from resnet_sweep import faults, launchers, preflight, stores, trials, workers
from resnet_sweep import space as spaces
from resnet_sweep.config import ConfigError
from resnet_sweep.errors import UserError, described, exit_with
from resnet_sweep.trials import counted
from resnet_sweep.workers import SWEEPER_PID_ENV, Terminated, install_sigterm_handler, uninterrupted

log = logging.getLogger(__name__)
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
# Trials launched beyond the n_jobs that train, waiting in joblib's worker pool: a worker that ends a trial
# starts the next within ~0.03 s instead of waiting ~0.1 s for this process to settle, ask and dispatch.
QUEUED_AHEAD = 1
SPACES = "search_spaces"  # study user attr: each search space and command that ran in the study, in order


@dataclass
class ResnetOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "resnet_sweep.sweeper.ResnetOptunaSweeper"
    n_jobs: Optional[int] = None  # trials at once; null: as many as the launcher runs (joblib's workers), else 1
    pruner: Optional[Any] = None  # an optuna.pruners class as an instantiate config (conf/pruner/)
    # a RUNNING trial silent for grace_period seconds (its process died or stopped) is retried
    heartbeat_interval: int = 5
    grace_period: int = 20
    max_failure_rate: float = 1.0  # stop once more than this share of the counted trials failed (1.0: never)
    timeout: Optional[float] = None  # seconds from the first trial's start (workers ready): none starts after
    trial_timeout: Optional[float] = None  # seconds a trial may train; a longer one fails (and counts)
    stall_timeout: Optional[float] = None  # seconds without a training step (null: adaptive, trials.py)
    allow_space_change: bool = False  # resume a study whose search space differs, on purpose


SETTINGS = [f.name for f in fields(ResnetOptunaSweeperConf) if not f.name.startswith("_")]
ConfigStore.instance().store(group="hydra/sweeper", name="resnet_optuna", node=ResnetOptunaSweeperConf,
                             provider="resnet_sweep")


class ResnetOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        names = set(SETTINGS)
        self.unknown = sorted(set(settings) - names)  # refused in _check: one line, not a TypeError
        self.s = SimpleNamespace(**{name: settings.get(name) for name in names})  # Hydra passes every setting
        self.pruner = trials.make_pruner(self.s.pruner)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.kind = launchers.kind(self.launcher)
        self.n_jobs = launchers.parallel(self.launcher, self.s.n_jobs)

    def sweep(self, arguments: list[str]) -> None:
        install_sigterm_handler()
        stores.mask_passwords_in_logs()
        self.parent = None
        try:  # before any study, run or trial exists
            space, fixed = self._space(arguments)
            self.n_trials = self._check(space, fixed)
        except UserError as exc:
            exit_with(exc)
        if self.kind == launchers.WORKERS:
            os.environ[SWEEPER_PID_ENV] = str(os.getpid())  # before any worker starts: workers watch this process
        study, name = None, None
        try:
            from resnet_sweep import tracking  # here: Hydra imports this module in every command (MLflow: ~3.5 s)

            with stores.store_lock(str(self.s.storage)):  # one process at a time: schema, study, MLflow database
                self.storage = trials.open_storage(str(self.s.storage), self.s.heartbeat_interval,
                                                   self.s.grace_period, self._stale)
                study = optuna.create_study(study_name=self.s.study_name, storage=self.storage, pruner=self.pruner,
                                            directions=self._directions(), load_if_exists=True)
                name, self.records = study.study_name, trials.Records(self.storage, study.study_name, self.pruner)
                history = self._same_space(study, space)  # refused before anything is written
                study.set_user_attr(SPACES, history)
                log.info("Study %s in %s: %d trials finished of n_trials=%d", name, stores.safe_url(
                    str(self.s.storage)), len(counted(study.trials)), self.n_trials)
                wait = self._warm() if len(counted(study.trials)) < self.n_trials else None
                if (t := self.config.tracking).enabled:  # a fresh MLflow database is made while workers warm up
                    tracking.prepare_store(t.uri, t.experiment, t.artifact_location)
                    tracking.close_dead_runs(t.uri)
            if wait is not None and (failed := wait()) is not None:
                log.warning("starting the workers failed (%s: %s); trials start them again", type(failed).__name__,
                            failed)
            self._started, self._done_here = time.monotonic(), 0  # for the progress lines' time left
            with stores.store_lock(str(self.s.storage)):  # the parent run starts when the workers can train
                self.parent = tracking.StudyRun(self.config, study, self._sampler_settings(), self.pruner, space,
                                                [(h["command"], spaces.describe(h["space"])) for h in history])
                self.parent.close_orphans(study.trials)
            self._run(study, space, fixed)
            launchers.stop(self.launcher)  # now, not at exit, where each worker spent ~3 s tearing down
            self._finish(study, self.n_trials)
        except UserError as exc:  # before any trial or run exists
            launchers.stop(self.launcher)
            exit_with(exc)
        except SystemExit:
            raise  # the failure summary has ended the parent run
        except (KeyboardInterrupt, Terminated) as exc:
            launchers.stop(self.launcher)
            if self.parent is not None:
                self.parent.end("KILLED", f"interrupted: {described(exc)}")
            log.error("Sweep interrupted (%s). %s", described(exc),
                      f"Trials in flight are marked interrupted; run the same command again to finish study '{name}'."
                      if self.parent else "No trial had started; run the same command again to start it.")
            raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 143) from None  # 128 + SIGINT/SIGTERM
        except BaseException as exc:
            launchers.stop(self.launcher)  # workers that started would keep this process ~6 s importing
            faults.stop_sweep(exc, str(self.s.storage), self.config.tracking, str(self.config.hydra.sweep.dir), name,
                              self.parent.end if self.parent is not None else None)
            if self.parent is not None:
                self.parent.end("FAILED", described(exc))
            raise

    def _directions(self) -> list[str]:
        given = self.s.direction
        return [getattr(d, "name", str(d)) for d in (given if isinstance(given, (list, ListConfig)) else [given])]

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """The search space (hydra.sweeper.params, then the command line) and the overrides every trial gets."""
        written = [f"{k}={v}" for k, v in (self.s.params or {}).items()] + list(arguments)
        self._written = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in written if "=" in o}
        return spaces.parse(written)

    def _n_trials(self, space: dict[str, Any]) -> int:
        """n_trials, or the grid's size where that is smaller."""
        if not self._grid():
            return self.s.n_trials
        return min(self.s.n_trials, math.prod(len(spaces.grid(d)) for d in space.values()))

    def _grid(self) -> bool:
        return str(self.s.sampler.get("_target_", "")).endswith("GridSampler")

    def _sampler_settings(self) -> dict[str, Any]:
        cfg = OmegaConf.to_container(self.s.sampler, resolve=True) if self.s.sampler else {}
        # TPE proposes while other trials run: with constant_liar it counts them as bad results (the worst
        # value so far) and does not propose their neighbourhood again before they end. On unless the
        # command line sets hydra.sweeper.sampler.constant_liar.
        if (str(cfg.get("_target_", "")).endswith("TPESampler") and self._capacity() > 1 and not any(
                o.split("=")[0].lstrip("+~") == "hydra.sweeper.sampler.constant_liar"
                for o in self.config.hydra.overrides.hydra)):
            cfg["constant_liar"] = True
        return cfg

    def _sampler(self, space: dict[str, Any], number: int) -> optuna.samplers.BaseSampler:
        """The sampler that proposes trial `number`. Seeded from (seed, trial number), not once: a sampler
        seeded once replays its proposals in every process that opens the study (a rerun, a second sweep,
        another machine); trial numbers are unique in a study, and samplers keep their state in the study.
        A grid keeps its seed, which orders the cells every process must agree on (asked under a lock)."""
        cfg = self._sampler_settings()
        if self._grid():
            return instantiate(cfg, _execution_whitelist_=SAMPLERS)({n: spaces.grid(d) for n, d in space.items()})
        if cfg.get("seed") is not None:
            cfg["seed"] = int(np.random.SeedSequence([cfg["seed"], number]).generate_state(1)[0])
        return instantiate(cfg, _execution_whitelist_=SAMPLERS)

    def _capacity(self) -> int:
        """Trials in flight at most: n_jobs training, and with worker processes QUEUED_AHEAD waiting."""
        return self.n_jobs + (QUEUED_AHEAD if self.kind == launchers.WORKERS else 0)

    def _check(self, space: dict[str, Any], fixed: list[str]) -> int:
        """What the command gets wrong, found before anything is created: the sweeper's and the launcher's
        settings, the config as the jobs will see it, every value of the search space, the stores. Returns
        the number of trials the study should hold (_n_trials)."""
        pruning = None if isinstance(self.pruner, optuna.pruners.NopPruner) else self.config.hydra.runtime.choices.get(
            "pruner", type(self.pruner).__name__)
        job_config, conf = preflight.settings(self.s, self.unknown, SETTINGS, self.config, pruning,
                                              launchers.check(self.launcher))
        self.objectives = conf.objective  # their names, a list (validate), for the progress lines and the front
        for distribution in space.values() if self._grid() else ():
            spaces.grid(distribution)  # ConfigError for an interval
        for name, distribution in space.items():  # an interval over an int key: its floats can never train
            if isinstance(distribution, optuna.distributions.FloatDistribution):
                preflight.whole_numbers(name, self._written.get(name, repr(distribution)), distribution.low, job_config)
        preflight.check({n: spaces.candidates(n, d, self._written.get(n, repr(d))) for n, d in space.items()}, fixed,
                        lambda o: self.hydra_context.config_loader.load_sweep_config(self.config, o))
        return self._n_trials(space)

    def _same_space(self, study: optuna.Study, space: dict[str, Any]) -> list[dict[str, Any]]:
        """The spaces and commands that ran in the study, this one added; ConfigError if this space differs
        from the study's last one, unless hydra.sweeper.allow_space_change=true (a choice's values can never
        change: Optuna keeps one set per parameter)."""
        now = {name: optuna.distributions.distribution_to_json(d) for name, d in space.items()}
        seen = {n: optuna.distributions.distribution_to_json(d) for t in study.trials for n, d in t.distributions.items()}
        history = list(study.user_attrs.get(SPACES, [])) or ([{"space": seen, "command": "?"}] if seen else [])
        last = history[-1]["space"] if history else now
        for key, old in last.items():
            if key in now and not spaces.compatible(old, now[key]):
                raise ConfigError(f"study '{study.study_name}' sweeps {key}={spaces.short(old)}; this command gives "
                                  f"{key}={spaces.short(now[key])}, which Optuna cannot put in the same study (a "
                                  f"choice's values, or a value's kind, never change in one). Start a new study: "
                                  f"add hydra.sweeper.study_name={study.study_name}-2")
        if last != now and not self.s.allow_space_change:
            raise ConfigError(f"study '{study.study_name}' was swept over another search space "
                              f"({spaces.changes(last, now)}). Start a new study (add hydra.sweeper.study_name="
                              f"{study.study_name}-2), or add hydra.sweeper.allow_space_change=true to go on in this "
                              f"one with the new space")
        from resnet_sweep import tracking  # see sweep()

        entry = {"space": now, "command": tracking.sweep_command(self.config)}
        return history if history and history[-1] == entry else [*history, entry]

    def _warm(self) -> Any:
        """Start joblib's worker processes while this process opens the stores (see launchers.warm)."""
        if self.kind != launchers.WORKERS:
            return None
        log.info("starting %d worker processes (each imports torch, MLflow, Optuna: a few seconds)", self.n_jobs)
        return launchers.warm(self.launcher, self.n_jobs, launchers.warm_up)

    def _run(self, study: optuna.Study, space: dict[str, Any], fixed: list[str]) -> None:
        """Keep up to n_jobs trials training (and QUEUED_AHEAD waiting for a worker) until the study holds
        n_trials counted ones, or hydra.sweeper.timeout has passed and nothing is in flight. As soon as a
        trial ends its result is settled and the next one asked. Waits while other processes' trials run
        (they may finish the study, or die and be retried here)."""
        self._in_flight: dict[int, float] = {}  # trial number -> when it was first seen ended (or 0)
        self._found_stale: set[int] = set()  # trials that fail_stale_trials failed here (see _stale)
        self._stale_todo: list[list[Any]] = []  # [trial, reason, status, retry?] still to queue and close
        self._pool_broken_for: int | None = None  # the trial whose stuck worker this process killed
        self._timed_out, n_trials, said_waiting = False, self.n_trials, False
        finished: queue.Queue = queue.Queue()  # (trial number, JobReturn or None, exception or None)
        stop_beat = trials.beat(self.storage, self._unstarted, self.s.heartbeat_interval)
        try:
            while True:
                try:
                    # one process at a time queues retries and asks; Ctrl-C or SIGTERM waits for the block's end
                    with stores.store_lock(str(self.s.storage)), uninterrupted():
                        optuna.storages.fail_stale_trials(study)
                        self._settle_stale(study)
                        self.records.queue_retries()
                        all_trials = study.get_trials(deepcopy=False)
                        done, timeout = counted(all_trials), self.s.timeout
                        self._timed_out = bool(timeout) and time.monotonic() - self._started >= timeout
                        if (len(done) >= n_trials or self._timed_out) and not self._in_flight:
                            return
                        self._check_failure_rate(study, done)
                        running = [t.number for t in all_trials if t.state == TrialState.RUNNING]
                        slots = 0 if self._timed_out else self._slots(all_trials, done, running)
                        batch = [self._ask(study, space) for _ in range(slots)]
                    for number in sorted(self._found_stale & set(self._in_flight)):
                        self._in_flight.pop(number)
                        job = self.records.find(number).user_attrs.get(trials.PROCESS) or {}
                        what, killed = workers.stop_job(job)
                        self._pool_broken_for = number if killed else self._pool_broken_for
                        log.warning("trial %d: %s; its slot is free", number, what)
                    self._found_stale.clear()
                    for trial in batch:
                        self._start(trial, space, fixed, finished)
                    if self._in_flight:
                        said_waiting = False
                        self._collect(study, finished)
                        continue
                    if not said_waiting:
                        said_waiting = True
                        log.info("waiting for %d trials that other processes run (%s)", len(running), running)
                    time.sleep(self.s.heartbeat_interval)
                except Exception as exc:
                    if not self._unlock(exc):
                        raise
        except BaseException as exc:  # SIGTERM, Ctrl-C, a launcher error: close what is in flight, then go
            launchers.stop(self.launcher)
            for number in list(self._in_flight):
                try:
                    self._interrupt(number, f"interrupted: sweep stopped by {described(exc)}")
                except Exception as error:  # noqa: BLE001 (the store may be why it stopped: a rerun finds it silent)
                    log.warning("trial %d: could not mark it interrupted (%s)", number, error)
            raise
        finally:
            stop_beat()

    def _slots(self, all_trials: list[optuna.trial.FrozenTrial], done: list[optuna.trial.FrozenTrial],
               running: list[int]) -> int:
        """How many trials to ask now: up to _capacity() in flight, and n_trials counted or running. A trial
        in flight whose job has ended it (interrupted: a fault of the environment) holds its place until
        its job comes back: its retry must not start before the sweep has read why it ended (a server down
        would interrupt the retry too). A trial whose worker died beside another's runs alone."""
        busy = set(running) | (set(self._in_flight) - {t.number for t in done})
        slots = min(self._capacity() - len(self._in_flight), self.n_trials - len(done) - len(busy))
        if any(t.state == TrialState.WAITING and trials.WORKER_DEATHS in t.system_attrs for t in all_trials):
            slots = min(slots, 0 if self._in_flight else 1)
        return max(slots, 0)

    def _unlock(self, exc: Exception) -> bool:
        """Whether the sweep goes on after `exc`, a store locked past SQLite's busy timeout (stores.LOCK_WAIT_S).
        A worker process of this sweep that holds the lock (its job stopped or stuck mid-write: SIGSTOP, a frozen
        disk) blocks every process of the study until it ends: it is killed and its trial runs again. A lock
        that another process held and has let go: the trials that met it run again. Else the sweep stops."""
        fault = faults.classify(exc)
        if fault is None or fault.stops_sweep:  # one rule with the jobs (faults.Fault.stops_sweep)
            return False
        uris = [*([str(self.s.storage)] if fault.store != "tracking" else []),
                *([self.config.tracking.uri] if self.config.tracking.enabled and fault.store != "study" else [])]
        killed = [pid for pid in stores.stuck_holders(uris) if workers.kill_worker(pid)]
        if killed:
            jobs = {n: self.records.find(n).user_attrs.get(trials.PROCESS, {}).get("pid") for n in self._in_flight}
            for number in [n for n, pid in jobs.items() if pid in killed]:
                self._pool_broken_for = number
                self._interrupt(number, f"interrupted: its job held a store's lock for over {stores.LOCK_WAIT_S:g} s "
                                        f"({fault.detail}); its worker process {jobs[number]} was killed")
            return True
        if all(stores.lock_free(uri) for uri in uris):
            log.warning("a store was locked for over %g s (%s) and is free again: the sweep goes on", stores.LOCK_WAIT_S,
                        fault.detail)
            return True
        return False

    def _ask(self, study: optuna.Study, space: dict[str, Any]) -> optuna.Trial:
        """The next trial (a queued retry first), with a first heartbeat at once: a trial asked by a process
        that dies before its job starts goes stale and is retried."""
        study.sampler = self._sampler(space, len(study.get_trials(deepcopy=False)))  # its trial's number
        trial = study.ask()
        self.storage.record_heartbeat(self.records.trial_id(trial.number))
        return trial

    def _unstarted(self) -> list[int]:
        """Ids of the trials in flight whose jobs have not started (queued on a cluster or in the pool): this
        process beats for them. A started job beats for its own trial, so a job that dies without a word is
        found by its silence, whatever becomes of this process."""
        found = [self.records.find(n) for n in list(self._in_flight)]
        return [self.records.trial_id(t.number) for t in found if trials.JOB not in t.user_attrs]

    def _start(self, trial: optuna.Trial, space: dict[str, Any], fixed: list[str], finished: queue.Queue) -> None:
        """Launch one trial's job through the configured launcher, as a batch of one: in this thread where the
        job runs in this process, else in a thread that waits for it while the launcher runs it elsewhere
        (the launcher interface is one blocking call per batch: this lets trials end one by one)."""
        params = {name: spaces.suggest(trial, name, d) for name, d in space.items()}
        if self.s.custom_search_space:  # the official sweeper's hook: a function (config, trial)
            instantiate({"_target_": self.s.custom_search_space, "_partial_": True})(self.config, trial)
        parent = getattr(self.parent, "run_id", None)  # its trials' runs become its children
        overrides = [*(f"{n}={v}" for n, v in params.items()), *fixed, _quoted("sweep.study", trial.study.study_name),
                     f"sweep.trial={trial.number}", *([_quoted("sweep.parent_run", parent)] if parent else []),
                     f"hydra.sweep.subdir={trial.number}"]  # job folder = trial number: unique across processes
        self._in_flight[trial.number] = 0.0
        log.info("trial %d started: %s", trial.number, " ".join(f"{n}={v}" for n, v in params.items()) or "(no swept key)")

        inline = self._capacity() == 1 or self.kind == launchers.INLINE

        def job() -> None:
            try:
                finished.put((trial.number, self.launcher.launch([overrides], initial_job_idx=trial.number)[0], None))
            except Exception if inline else BaseException as exc:  # noqa: BLE001 (the sweeping thread decides)
                finished.put((trial.number, None, exc))

        if inline:
            job()  # Ctrl-C and SIGTERM propagate from here
        else:
            threading.Thread(target=job, name=f"trial-{trial.number}", daemon=True).start()

    def _collect(self, study: optuna.Study, finished: queue.Queue) -> None:
        """Settle the trials that finished (waiting up to a heartbeat interval for one)."""
        try:
            results = [finished.get(timeout=self.s.heartbeat_interval)]
        except queue.Empty:
            self._release_ended(study)
            return
        while not finished.empty():
            results.append(finished.get_nowait())
        results = [r for r in results if r[0] in self._in_flight]  # a released trial's job, come back late
        if any(launchers.worker_died(exc) for _, _, exc in results):
            # loky stops every worker of its pool when one dies: every trial in flight fails with it
            while not set(self._in_flight) <= {n for n, _, _ in results}:
                results += [r for r in [finished.get(timeout=300)] if r[0] in self._in_flight]
            self._worker_died([n for n, _, exc in results if launchers.worker_died(exc)],
                              next(exc for _, _, exc in results if launchers.worker_died(exc)))
        met: list[faults.Fault] = []
        for number, ret, exc in results:
            if exc is not None and not launchers.worker_died(exc):
                self._job_raised(number, exc)  # may stop the sweep: the trial is still in flight then
            self._in_flight.pop(number, None)
            if ret is not None:
                self._settle(number, ret)
            self._progress(study, number)
            if fault := self.records.find(number).user_attrs.get(trials.ENVIRONMENT):
                met.append(faults.Fault(**fault))
        if met:  # once every trial here is settled: the trials after them would meet it too
            raise faults.EnvironmentStop(met[0])

    def _settle(self, number: int, ret: JobReturn) -> None:
        """A trial that its job left RUNNING (it failed before it could tell): failed, unless the environment
        was at fault (_environment)."""
        if ret.status == JobStatus.FAILED:
            try:
                ret.return_value  # noqa: B018 (raises the job's exception)
            except Exception as error:  # noqa: BLE001
                if not self._environment(number, error):
                    self.records.end(number, TrialState.FAIL, reason=described(error))
        else:
            self.records.settle(number, ret.return_value)

    def _job_raised(self, number: int, exc: BaseException) -> None:
        """The launcher raised for a trial's job (outside the task, or the job never ran): a cluster job
        lost (interrupted) or failed; a job stopped from outside, or with its pool (interrupted); a config
        that does not compose (the trial fails alone); a fault of the environment (_environment). Anything
        else is the launcher's, and stops the sweep."""
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}"
        if launchers.job_lost(exc) == "interrupted":
            self._interrupt(number, f"interrupted: its job ended without a result ({error})")
        elif isinstance(exc, (Terminated, KeyboardInterrupt)):
            self._interrupt(number, f"interrupted: its job was stopped ({error})")
        elif launchers.pool_shut_down(exc):  # another trial's job raised outside its task (it fails alone)
            self._interrupt(number, "interrupted: joblib stopped the worker pool, and its job with it, because "
                                    "another trial's job raised outside its task")
        elif launchers.job_lost(exc) == "failed" or isinstance(exc, (HydraException, OmegaConfBaseException, UserError)):
            reason = f"its job failed ({error})" if launchers.job_lost(exc) else f"its config does not compose: {error}"
            if self.records.end(number, TrialState.FAIL, reason=reason):
                self._kill_run(number, reason, status="FAILED")
                log.error("trial %d failed: %s", number, reason)
        elif not self._environment(number, exc):
            raise exc  # a launcher error: the sweep stops (see _run)

    def _environment(self, number: int, error: BaseException) -> bool:
        """Whether `error`, which a trial's job met, is a fault of the environment (faults.py); if so the trial
        is interrupted (it runs again), and unless the sweep frees it (Fault.stops_sweep) the sweep stops once
        the trials at hand are settled (see _collect)."""
        fault = faults.classify(error)
        if fault is not None:
            self._interrupt(number, f"interrupted: {fault}", **trials.environment(fault))
        return fault is not None

    def _release_ended(self, study: optuna.Study) -> None:
        """Free the slot of a cluster job whose trial has ended while the launcher still waits for the job.
        Why: submitit waits for a job that SLURM preempted as if it were to be requeued, but ours are not
        (--no-requeue), and the job told its trial first (interrupted, to be retried). The waiting thread
        is left to itself; what it brings back later is ignored."""
        now, wait = time.monotonic(), max(30.0, 3.0 * self.s.heartbeat_interval)  # submitit usually answers first
        for number, ended in list(self._in_flight.items()):
            if self.kind != launchers.CLUSTER or self.records.find(number).state == TrialState.RUNNING:
                continue
            if not ended:
                self._in_flight[number] = now
            elif now - ended >= wait:
                log.info("trial %d has ended, but its job has not come back in %.0f s: its slot is free", number, wait)
                del self._in_flight[number]
                self._progress(study, number)
                if fault := self.records.find(number).user_attrs.get(trials.ENVIRONMENT):
                    raise faults.EnvironmentStop(faults.Fault(**fault))  # as _collect: its retry would meet it

    def _worker_died(self, numbers: list[int], exc: BaseException) -> None:
        """A worker process died (the kernel killed it: out of memory? or this sweep did, to stop a stuck
        trial). loky then kills every other worker of its pool, so with several trials in flight the victim
        is unknown: each is retried alone (see _run), and a trial whose worker dies alone has failed. Where
        this sweep killed the worker, the trials beside it are simply retried."""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        left = [n for n in numbers if self.records.find(n).state == TrialState.RUNNING]
        stopped, self._pool_broken_for = self._pool_broken_for, None
        for number in left:
            if stopped is not None:
                self._interrupt(number, f"interrupted: its worker pool restarted to stop trial {stopped}, which "
                                        f"made no progress")
            elif len(left) == 1:
                self.records.end(number, TrialState.FAIL, reason=f"its worker process died ({error})")
                self._kill_run(number, f"its worker process died ({error})", status="FAILED")
            else:
                self._interrupt(number, f"interrupted: a worker process died beside it ({error})",
                                **{trials.WORKER_DEATHS: True})
        if stopped is None:
            log.error("A worker process died (%s); the sweep goes on with fresh workers", error)

    def _interrupt(self, number: int, reason: str, **attrs: Any) -> None:
        if self.records.end(number, TrialState.FAIL, reason=reason, interrupted=True, **attrs):
            log.warning("trial %d %s; its parameters will run again", number, reason)
        self._kill_run(number, reason)

    def _kill_run(self, number: int, reason: str, status: str = "KILLED") -> None:
        """End trial `number`'s runs `status`; not with a tracking server that does not answer (each request
        would wait out MLflow's retries, minutes): the next sweep of the study closes them (close_orphans)."""
        if self.parent is not None and stores.answers(self.config.tracking.uri):
            self.parent.end_trial_runs(number, reason, status)

    def _stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """fail_stale_trials failed this RUNNING trial (no heartbeat for grace_period s): its process died or
        stopped, or its job made no progress (it stops beating then: trials.JobTrial). Noted here and settled
        by _settle_stale: an exception in this callback would skip the callbacks of the other stale trials,
        which would then count as failed."""
        stalled = trial.user_attrs.get(trials.STALLED)
        reason = str(trial.user_attrs.get("fail_reason") if stalled else
                     f"interrupted: no heartbeat for {self.s.grace_period} s (its process died or stopped)")
        if stalled and trial.system_attrs.get(trials.STALLS, 0) >= trials.STALL_RETRIES:
            self._stale_todo.append([trial, reason, "FAILED", False])
            log.error("trial %d made no progress, as it did twice before: it counts as failed", trial.number)
        else:
            self._stale_todo.append([trial, reason, "KILLED", True])
            log.warning("trial %d: %s; its parameters will run again", trial.number, reason)
        self._found_stale.add(trial.number)

    def _settle_stale(self, study: optuna.Study) -> None:
        """Queue the parameters of each trial _stale noted again (unless they stalled too often: then it
        counts, FAIL), end its runs, and have _run stop its job; retries first, each once (another sweep's
        queue_retries may have queued it meanwhile). Under the store lock. What raises (a store locked by
        a stopped worker) stays noted for the next turn of _run. A trial in flight here that another
        process found stale (its callback ran there) is stopped too."""
        all_trials, noted = study.get_trials(deepcopy=False), {entry[0].number for entry in self._stale_todo}
        self._found_stale |= {t.number for t in all_trials if t.number in self._in_flight and t.number not in noted
                              and t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs}
        queued = trials.retried(all_trials)
        for entry in self._stale_todo:
            trial, reason, _, retry = entry
            if retry and trial.number not in queued:
                self.records.retry(trial, reason)
            entry[3] = False
        while self._stale_todo:
            trial, reason, status, _ = self._stale_todo[0]
            self._kill_run(trial.number, reason, status=status)
            self._stale_todo.pop(0)

    def _progress(self, study: optuna.Study, number: int) -> None:
        """One line per finished trial: its result, how far the study is, the best so far, time left."""
        all_trials = study.get_trials(deepcopy=False)
        trial, done = next(t for t in all_trials if t.number == number), counted(all_trials)
        self._done_here += 1
        states = ", ".join(f"{n} {s.name}" for s in trials.FINISHED if (n := sum(t.state == s for t in done)))
        elapsed, left = time.monotonic() - self._started, max(self.n_trials - len(done), 0)
        eta = f", about {_duration(elapsed / self._done_here * left)} left" if left else ""
        result = trial.state.name if not trial.values else f"{trial.state.name}, " + ", ".join(
            f"{n} {v:.4g}" for n, v in zip(self.objectives, trial.values))
        if number in trials.interrupted(all_trials):
            result = "interrupted (to run again)"
        best = ""
        if len(self._directions()) == 1 and any(t.state == TrialState.COMPLETE for t in all_trials):
            best = f" | best {study.best_trial.value:.4g} (trial {study.best_trial.number})"
        log.info("trial %d: %s | %d of %d trials done (%s)%s | %s elapsed%s", number, result, len(done),
                 self.n_trials, states or "none counted", best, _duration(elapsed), eta)

    def _check_failure_rate(self, study: optuna.Study, done: list[optuna.trial.FrozenTrial]) -> None:
        failed = [t for t in done if t.state == TrialState.FAIL]
        if done and len(failed) / len(done) > self.s.max_failure_rate:
            self._fail(study, f"{len(failed)} of its {len(done)} finished trials failed, more than "
                              f"hydra.sweeper.max_failure_rate={self.s.max_failure_rate}")

    def _fail(self, study: optuna.Study, why: str) -> None:
        """End the sweep with a one-paragraph summary and exit code 1."""
        failed = [t for t in counted(study.trials) if t.state == TrialState.FAIL]
        reasons = sorted({str(t.user_attrs.get("fail_reason", "?")) for t in failed})
        # a trial whose config never composed has no run; of a trial's seeds, the run that failed holds the tag
        where = ("Each run that failed holds its reason in MLflow, in the tag failure_reason. " if any(
            t.user_attrs.get("mlflow_run_id") for t in failed) else "")
        summary = (f"Sweep failed: {why} (study '{study.study_name}'). Reasons: {'; '.join(reasons)[:2000]}. "
                   f"{where}Rerunning the same command adds "
                   f"no trials to this study: once the cause is fixed, start a new study, e.g. by adding "
                   f"hydra.sweeper.study_name={study.study_name}-2 to the command.")
        self.parent.finish(None, failed=summary)
        self.parent.end("FAILED", summary)
        log.error(summary)
        raise SystemExit(1)

    def _finish(self, study: optuna.Study, n_trials: int) -> None:
        done = counted(study.trials)
        counts = {s.name: sum(t.state == s for t in done) for s in trials.FINISHED}
        counts["INTERRUPTED"] = len(trials.interrupted(study.trials))
        complete = any(t.state == TrialState.COMPLETE for t in done)
        if self._timed_out and len(done) < n_trials:
            log.warning("hydra.sweeper.timeout=%g s has passed: no trial started after it; %d of %d trials done. Run "
                        "the same command again to go on with study '%s'.", self.s.timeout, len(done),
                        n_trials, study.study_name)
            if not complete:
                self.parent.finish(None)
                return self.parent.end("FINISHED")
        if not complete:
            self._fail(study, f"none of its {len(done)} trials completed ({counts['FAIL']} failed, "
                              f"{counts['PRUNED']} pruned)")
        results: dict[str, Any] = {"name": "optuna", "trials": counts}
        if len(self._directions()) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number,
                           best_mlflow_run_id=best.user_attrs.get("mlflow_run_id"))
            log.info("Best trial %d: value %s, params %s (MLflow run %s)", best.number, best.value, best.params,
                     best.user_attrs.get("mlflow_run_id"))
        else:  # several objectives: the Pareto-optimal trials, tagged pareto=true on their runs
            front = sorted(study.best_trials, key=lambda t: t.number)
            results["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values,
                                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]
            self.parent.tag_pareto([r for t in front for r in t.user_attrs.get("mlflow_run_ids") or  # every seed's
                                    [t.user_attrs.get("mlflow_run_id")]])
            log.info("Pareto-optimal trials (%s): %s", ", ".join(f"{n} {d}" for n, d in zip(
                self.objectives, self._directions())), "; ".join(
                f"trial {t.number}: {[float(f'{v:.6g}') for v in t.values]} {t.params}" for t in front))
        path = Path(f"{self.config.hydra.sweep.dir}/optimization_results.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)  # a rerun with nothing left to do launches no job
        OmegaConf.save(OmegaConf.create(results), path)
        log.info("Trials: %s; results in %s", counts, path)
        self.parent.finish(results, results_file=path)
        if (self.config.get("report") or self.config.get("claims")) and self.config.tracking.enabled:
            from resnet_sweep import report  # only sweeps that ask for a report (or claims) pay for matplotlib

            try:  # the trials are recorded whatever becomes of their report
                report.write_report(self.config.tracking.uri, sweep_run_id=self.parent.run_id)
            except Exception as exc:  # noqa: BLE001
                log.error("the report failed (%s: %s); python -m resnet_sweep.report --run %s draws it again",
                          type(exc).__name__, exc, self.parent.run_id)
        elif self.config.get("claims"):
            log.warning("tracking.enabled=false: the claims are not checked (the report reads them from MLflow)")
        self.parent.end("FINISHED")


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _quoted(key: str, value: str) -> str:
    """`key='value'` quoted for Hydra's override grammar, so any study name (non-ASCII, `/`, `,`, quotes,
    `${`) reaches the job as it is: backslashes escaped before a quote or at the end, `\\${` keeps OmegaConf
    from reading an interpolation."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"{key}='{escaped}'"
