"""A study's trials as the sweeping process and its jobs share them, across any number of processes:
the rules of what counts, interrupted trials queued again, heartbeats, and a job's handle on its trial.

Who writes what: the sweeping process asks trials and launches jobs; each job tells its own trial's
result (so a result survives whatever happens to the process that launched it). A trial stopped from
outside (kill, SIGTERM, Ctrl-C, a lost heartbeat, a stall, a fault of the environment) is *interrupted*:
FAIL with the reason, and a WAITING copy with its parameters is queued, which the next `ask()` of any
process takes. An interrupted trial stays visible but does not count towards n_trials (`counted`).
Only Optuna's public API: its RDB storage (heartbeats, user attrs, intermediate values by trial id),
`study.tell(..., skip_if_finished=True)`, `add_trial`, a pruner's `prune`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import threading
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from resnet_sweep import faults
from resnet_sweep.errors import described
from resnet_sweep.stores import create_whole, wait_for_sqlite_locks
from resnet_sweep.workers import Stalled, Terminated, interrupt_main, slurm_job_id, uninterrupted

log = logging.getLogger(__name__)
# Optuna marks storage heartbeats experimental and meant for study.optimize; we beat ourselves.
warnings.filterwarnings("ignore", message=r".*heartbeat", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# system attrs of a retry, named as Optuna's RetryFailedTrialCallback names them, so that its
# retried_trial_number() and retry_history() read our retries too
RETRY_OF, RETRY_HISTORY = "failed_trial", "retry_history"
WORKER_DEATHS = "worker_died"  # a trial whose worker process died beside another's; its retry runs alone
STALLS = "stalls"  # system attr of a retry: how often these parameters stalled before
INTERRUPTED = "interrupted"  # user attr of a trial stopped from outside: FAIL, retried, not counted
JOB = "job"  # user attr: the job that trains the trial has started and beats for it itself
PROCESS = "job_process"  # user attr: where that job runs, {"host", "pid", "slurm"}, so a sweep can stop it
ENVIRONMENT = "environment"  # user attr: the fault of the environment (faults.Fault) that interrupted it
STALLED = "stalled"  # user attr: the job made no progress for its stall limit (set by its watchdog)
STALL_RETRIES = 2  # parameters that stalled this often before count as FAIL when they stall again
# Liveness is progress (a training step), not a thread: a job that makes none for its stall limit stops
# beating and is stopped. Adaptive unless hydra.sweeper.stall_timeout says otherwise: STALL_FACTOR times
# the slowest gap between two steps so far (an epoch's end and its validation included), never under
# STALL_FLOOR, which is above MLflow's own ~4 minutes of retries of a server that does not answer (so that
# a store outage is told as such); before the first step (data, model, compile), STARTUP_STALL.
STALL_FACTOR, STALL_FLOOR, STARTUP_STALL = 20.0, 300.0, 600.0


def open_storage(url: str, heartbeat_interval: int, grace_period: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for `url`, with heartbeats (a RUNNING trial silent for grace_period seconds is
    stale) and, for SQLite, a busy timeout so parallel workers wait for each other instead of failing.
    The first opening creates Optuna's schema: do that under stores.store_lock (two processes collide)."""
    wait_for_sqlite_locks()
    create_whole(url, lambda partial: optuna.storages.RDBStorage(partial).engine.dispose())
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                      heartbeat_stale_trial_callback=on_stale)


def make_pruner(config: Any) -> optuna.pruners.BasePruner:
    """The pruner that hydra.sweeper.pruner configures (conf/pruner/), none by default."""
    from hydra.utils import instantiate

    return instantiate(config, _execution_whitelist_=("optuna.pruners.*",)) if config else optuna.pruners.NopPruner()


def environment(fault: faults.Fault) -> dict[str, Any]:
    """The user attrs that mark a trial interrupted by `fault`: ENVIRONMENT, which stops the sweep once the
    trials at hand are settled (sweeper._collect), where the fault does (Fault.stops_sweep)."""
    return {ENVIRONMENT: vars(fault)} if fault.stops_sweep else {}


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were interrupted and queued again."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}


def interrupted(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials stopped from outside: marked so by whoever stopped them, or found silent and
    queued again by a sweep (a stale trial can carry no mark: Optuna fails it first). Found silent, whose
    sweep stopped before it queued them again: a FAIL without a reason (every FAIL written here has one:
    Records.end), and one that stalled fewer times than counts (its watchdog marked it)."""
    return retried(trials) | {t.number for t in trials if t.state == TrialState.FAIL and (
        t.user_attrs.get(INTERRUPTED) or "fail_reason" not in t.user_attrs
        or (t.user_attrs.get(STALLED) and t.system_attrs.get(STALLS, 0) < STALL_RETRIES))}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that finished on their own (complete, pruned, or failed by their job): n_trials counts these."""
    stopped = interrupted(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in stopped]


class Records:
    """One study's trials, read and written by trial number through its storage. Its study object settles
    trials and never samples (so a grid sampler's end of grid stays out of it)."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str, pruner: Any = None) -> None:
        self.storage = storage
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                                       sampler=optuna.samplers.RandomSampler())
        self.study_id = storage.get_study_id_from_name(study_name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def find(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))

    def set(self, number: int, **attrs: Any) -> None:
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(self.trial_id(number), key, value)

    def end(self, number: int, state: TrialState, values: list[float] | None = None, reason: str | None = None,
            interrupted: bool = False, **attrs: Any) -> bool:
        """Finish trial `number` unless another process did first; True if this call finished it. `reason`
        and `attrs` become user attrs first; an interrupted trial is FAIL, marked so (queue_retries)."""
        if self.find(number).state != TrialState.RUNNING:
            return False
        try:
            self.set(number, **({"fail_reason": reason[:5000]} if reason else {}),
                     **({INTERRUPTED: True} if interrupted else {}), **attrs)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # another process (the job, the sweeper, a stale check) finished it first
        self.study.tell(number, state=state, values=values, skip_if_finished=True)
        return True

    def settle(self, number: int, value: Any, reason: str | None = None) -> None:
        """A job's objective (or list of objectives) as its trial's result: a non-finite one is never a
        result (NaN would be a trial's value, inf the best one), it FAILs the trial."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or any(v is None or not math.isfinite(float(v)) for v in values):
            self.end(number, TrialState.FAIL, reason=reason or f"objective was {value}")
        else:
            self.end(number, TrialState.COMPLETE, [float(v) for v in values])

    def retry(self, trial: FrozenTrial, reason: str) -> None:
        """Queue a WAITING copy of an interrupted trial: same parameters and sampler attributes (a grid cell
        keeps its grid_id), its own user attrs (RetryFailedTrialCallback would copy the interrupted trial's
        run id and reason, which are that trial's only)."""
        attrs = {**trial.system_attrs, RETRY_OF: trial.system_attrs.get(RETRY_OF, trial.number),
                 RETRY_HISTORY: [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]}
        attrs.update({WORKER_DEATHS: True} if trial.user_attrs.get(WORKER_DEATHS) else {})
        attrs.update({STALLS: trial.system_attrs.get(STALLS, 0) + 1} if trial.user_attrs.get(STALLED) else {})
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=attrs,
            user_attrs={"retry_of": trial.number, "retry_reason": reason[:2000]}))

    def queue_retries(self) -> None:
        """Queue a retry of every interrupted trial that has none. Under the study's store lock (two processes
        would queue two): the process that stops a trial only marks it, since it may die the next moment."""
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in sorted(interrupted(list(trials.values())) - retried(list(trials.values()))):
            self.retry(trials[number], str(trials[number].user_attrs.get("fail_reason", "interrupted")))


def beat(storage: Any, trial_ids: Callable[[], list[int]], interval: float,
         alive: Callable[[], bool] = lambda: True) -> Callable[[], None]:
    """Record a heartbeat for trial_ids() every `interval` s in a thread while alive(), so other processes
    see those trials live; returns the function that stops it."""
    stop = threading.Event()

    def loop() -> None:
        def ids() -> list[int]:
            try:
                return trial_ids() if alive() else []
            except Exception:  # noqa: BLE001 (the store may be locked or down for a while)
                return []

        while True:
            for trial_id in ids():
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 (a missed beat is harmless; the next one comes in `interval`)
                    pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, daemon=True, name="optuna-heartbeat")
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join()

    return halt


class TrialEnded(Terminated):
    """The job's trial was ended by another process (found stale) while the job went on: the job stops and
    records nothing over what that process recorded."""


class TrialTimeout(Exception):
    """The trial ran longer than hydra.sweeper.trial_timeout: its own fault, so it fails (and counts)."""


class JobStopped(Exception):
    """What a job whose trial was interrupted (stalled) raises to its launcher: an Exception, so that Hydra
    hands it back as the job's failure and the sweep goes on (a BaseException would cross the launcher)."""


@functools.lru_cache(maxsize=4)
def _job_records(url: str, study: str, heartbeat_interval: int, grace_period: int) -> Records:
    """One storage per worker process and study: a reused worker opens (and checks) the database once."""
    return Records(open_storage(url, heartbeat_interval, grace_period), study)


class JobTrial:
    """A job's handle on its own trial (the job runs apart from the sweeper, maybe in a worker process or on
    another machine): heartbeat while it makes progress, epochs reported for pruning, run ids left for
    the sweeper, and the result told by the job itself."""

    def __init__(self, study: str, storage: str, number: int, sweeper: Any) -> None:
        self.records = _job_records(storage, study, sweeper.get("heartbeat_interval", 5), sweeper.get("grace_period", 20))
        self.pruner, self.number = make_pruner(sweeper.get("pruner")), number
        frozen = self.records.find(number)
        self.trial_id, self.stalls, self.attrs = self.records.trial_id(number), frozen.system_attrs.get(STALLS, 0), {}
        # a job started for a trial that has ended (e.g. SLURM started again a job whose trial was retried as
        # another one) has nothing to do
        self.ended = (None if frozen.state == TrialState.RUNNING else
                      f"{frozen.state.name}, {frozen.user_attrs.get('fail_reason', 'its result told')}")
        self.stall_timeout, self.trial_timeout = sweeper.get("stall_timeout"), sweeper.get("trial_timeout")
        self._started = self._last_step = time.monotonic()
        self._slowest, self._stepped, self._stalled = 0.0, False, ""
        self._stop_beat: Callable[[], None] = lambda: None
        if self.ended is None:
            self._stop_beat = beat(self.records.storage, lambda: [self.trial_id], sweeper.get("heartbeat_interval", 5),
                                   alive=self._progressing)
            slurm = slurm_job_id()
            self.set(**{JOB: f"SLURM job {slurm}" if slurm else f"pid {os.getpid()} on {socket.gethostname()}",
                        PROCESS: {"host": socket.gethostname(), "pid": os.getpid(), "slurm": slurm}})

    def step(self) -> None:
        """A training step is done: the job makes progress. Raises TrialTimeout past the trial's time limit."""
        now = time.monotonic()
        if self._stepped:
            self._slowest = max(self._slowest, now - self._last_step)
        self._stepped, self._last_step = True, now
        if self.trial_timeout and now - self._started > self.trial_timeout:
            raise TrialTimeout(f"the trial ran longer than hydra.sweeper.trial_timeout={self.trial_timeout:g} s")

    def _progressing(self) -> bool:
        """In the heartbeat thread: whether to beat. A job silent for its stall limit beats no more (any sweep
        of the study then finds its trial stale), marks its trial stalled and is stopped: Stalled is raised
        in its main thread (a blocking system call returns to Python when signalled)."""
        limit = float(self.stall_timeout or (max(STALL_FLOOR, STALL_FACTOR * self._slowest) if self._stepped
                                             else STARTUP_STALL))
        idle = time.monotonic() - self._last_step
        if self._stalled or idle <= limit:
            return not self._stalled
        self._stalled = f"no training step for {idle:.0f} s (its stall limit: {limit:.0f} s)"
        log.error("trial %d: %s; stopping it", self.number, self._stalled)
        try:
            self.records.set(self.number, **{"fail_reason": f"interrupted: {self._stalled}", STALLED: True})
        except Exception:  # noqa: BLE001 (the store may be why it stalled; its silence says enough)
            pass
        interrupt_main(Stalled(self._stalled))
        return False

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)
        with uninterrupted():
            self.records.set(self.number, **attrs)

    def should_prune(self, value: float, epoch: int) -> bool:
        """Report the epoch's objective (TrialEnded if another process has ended the trial meanwhile)."""
        with uninterrupted():
            try:
                self.records.storage.set_trial_intermediate_value(self.trial_id, epoch, float(value))
            except optuna.exceptions.UpdateFinishedTrialError:
                raise TrialEnded(f"trial {self.number} was ended by another process "
                                 f"({self.records.find(self.number).user_attrs.get('fail_reason', 'finished')})")
            return (not isinstance(self.pruner, optuna.pruners.NopPruner)  # a NopPruner saves a read per epoch
                    and self.pruner.prune(self.records.study, self.records.find(self.number)))

    def finish(self, value: float | list[float]) -> None:
        """Tell the trial's result: PRUNED (valued by the last report) if the pruner stopped it, else as
        Records.settle has it."""
        with uninterrupted():
            if "pruned_at_epoch" in self.attrs:
                self.records.end(self.number, TrialState.PRUNED)
            else:
                self.records.settle(self.number, value, self.attrs.get("fail_reason"))

    def fail(self, exc: BaseException) -> None:
        """The job raised: its own failure (FAIL, counted), an interruption from outside or a stall (retried),
        or a fault of the environment (retried, and the sweep stops: faults.py)."""
        if isinstance(exc, TrialEnded):
            return
        reason, fault = described(exc), faults.classify(exc)
        if isinstance(exc, Stalled) and self.stalls >= STALL_RETRIES:  # these parameters stall: it counts
            args: dict[str, Any] = {"reason": f"{exc}; these parameters stalled {self.stalls + 1} times"}
        elif isinstance(exc, (Terminated, KeyboardInterrupt)):
            args = {"reason": f"interrupted: {reason}", "interrupted": True}
        elif fault is not None:
            args = {"reason": f"interrupted: {fault.kind}: {reason}", "interrupted": True, **environment(fault)}
        else:
            args = {"reason": self.attrs.get("fail_reason") or reason}
        try:
            with uninterrupted():
                self.records.end(self.number, TrialState.FAIL, **args)
        except Exception as error:  # noqa: BLE001 (e.g. the disk is full: a sweep finds the trial silent)
            log.error("trial %d: its end could not be recorded (%s: %s); a sweep of the study finds it silent and "
                      "retries it", self.number, type(error).__name__, error)

    def close(self) -> None:
        self._stop_beat()
