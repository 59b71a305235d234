"""Optuna trials as a sweep and its jobs share them, across any number of processes: the storage,
interrupted trials retried, and a job's handle on its own trial (heartbeat, pruning, result).

Who writes what: the sweeping process asks trials and launches jobs; each job tells its own trial's
result (so a result survives whatever happens to the process that launched it). A trial stopped from
outside (kill, SIGTERM, Ctrl-C, a lost heartbeat) is *interrupted*: FAIL with the reason, and a WAITING
copy with the same parameters is queued (queue_retries), which the next `ask()` of any process of the
study takes. An interrupted trial stays visible but does not count towards n_trials (see `counted`).
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
from resnet_sweep.stores import create_whole, wait_for_sqlite_locks
from resnet_sweep.workers import Stalled, Terminated, interrupt_main, slurm_job_id, uninterrupted

log = logging.getLogger(__name__)

# Optuna marks storage heartbeats experimental and meant for study.optimize; we beat ourselves.
warnings.filterwarnings("ignore", message=r".*heartbeat", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# system attrs of a retry, named as Optuna's RetryHeartbeatStaleTrialCallback names them, so its
# retried_trial_number() and retry_history() read our retries too
RETRY_OF, RETRY_HISTORY = "failed_trial", "retry_history"
WORKER_DEATHS = "worker_died"  # a trial whose worker process died beside another, and its retry (see sweeper)
INTERRUPTED = "interrupted"  # user attr of a trial stopped from outside: FAIL, retried, not counted
JOB = "job"  # user attr: the job that trains the trial (a SLURM job id, or a process) has started and beats itself
PROCESS = "job_process"  # user attr: where that job runs, {"host", "pid", "slurm"}, so a sweep can stop it
ENVIRONMENT = "environment"  # user attr of a trial interrupted by a fault of the environment (faults.py)
STALLED = "stalled"  # user attr: the job made no progress for its stall limit (set by its watchdog)
STALLS = "stalls"  # system attr of a retry: how often these parameters stalled before
STALL_RETRIES = 2  # parameters that stalled this often before count as FAIL when they stall again
# Liveness is progress (a training step), not a thread: a job that makes none for this long stops beating
# and is stopped. Adaptive unless hydra.sweeper.stall_timeout says otherwise: STALL_FACTOR times the
# slowest gap between two steps so far (an epoch's end and its validation included), never under
# STALL_FLOOR, which is above MLflow's own retries of an unreachable server (~4 min), so that a store
# outage is told as such; before the first step (data, model, compile) STARTUP_STALL.
STALL_FACTOR, STALL_FLOOR, STARTUP_STALL = 20.0, 300.0, 600.0


def open_storage(url: str, heartbeat_interval: int, grace_period: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> Any:
    """Optuna's RDB storage for `url`, with heartbeats (a RUNNING trial silent for grace_period seconds is
    stale) and, for SQLite, a busy timeout so parallel workers wait for each other instead of failing.
    The first opening creates Optuna's schema: do that under stores.store_lock (two processes at once collide)."""
    if not isinstance(url, str) or url.startswith("journal"):
        return url
    wait_for_sqlite_locks()
    create_whole(url, lambda partial: optuna.storages.RDBStorage(partial).engine.dispose())
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period, heartbeat_stale_trial_callback=on_stale)


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were interrupted and queued again."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}


def interrupted(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials stopped from outside: marked so by whoever stopped them, or found silent and
    queued again by a sweep (a stale trial can carry no mark: Optuna fails it first)."""
    return retried(trials) | {t.number for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED)}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that finished on their own (complete, pruned, or failed by their job): n_trials counts these."""
    stopped = interrupted(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in stopped]


def retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Queue a WAITING copy of an interrupted trial: same parameters and sampler attributes (a grid cell
    keeps its grid_id), its own user attrs. Optuna's RetryHeartbeatStaleTrialCallback would also copy the
    user attrs (the old MLflow run id, the failure reason), which belong to the interrupted trial only."""
    attrs = {**trial.system_attrs, RETRY_OF: trial.system_attrs.get(RETRY_OF, trial.number),
             RETRY_HISTORY: [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]}
    if trial.user_attrs.get(WORKER_DEATHS):
        attrs[WORKER_DEATHS] = True
    if trial.user_attrs.get(STALLED):
        attrs[STALLS] = trial.system_attrs.get(STALLS, 0) + 1
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=attrs,
        user_attrs={"retry_of": trial.number, "retry_reason": reason[:2000]}))


def queue_retries(study: optuna.Study) -> None:
    """Queue a retry of every interrupted trial that has none yet. Run under the study's store lock (two
    processes at once would queue two): the process that stops a trial only marks it, since it may die
    the next moment (joblib SIGKILLs its workers when the sweep is interrupted)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in sorted(interrupted(list(trials.values())) - retried(list(trials.values()))):
        retry(study, trials[number], str(trials[number].user_attrs.get("fail_reason", "interrupted")))


def end(study: optuna.Study, number: int, state: TrialState, values: list[float] | None = None,
        reason: str | None = None, interrupted: bool = False, **attrs: Any) -> bool:
    """Finish trial `number` unless another process did first; True if this call finished it. `reason`
    and `attrs` become user attrs first. An interrupted trial is FAIL, marked so; queue_retries then
    queues its parameters again."""
    frozen = find(study, number)
    if frozen.state != TrialState.RUNNING:
        return False
    storage = study._storage  # noqa: SLF001 (user attrs by trial id; a Trial object would run the sampler)
    try:
        for key, value in {**({"fail_reason": reason[:5000]} if reason else {}),
                           **({INTERRUPTED: True} if interrupted else {}), **attrs}.items():
            storage.set_trial_user_attr(frozen._trial_id, key, value)  # noqa: SLF001
        if not storage.set_trial_state_values(frozen._trial_id, state, values):  # noqa: SLF001
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process (the job, the sweeper, a stale check) finished it first
    if not interrupted:
        # what study.tell does after storing the state: the sampler's bookkeeping (e.g. the grid's end)
        try:
            study.sampler.after_trial(study, find(study, number), state, values)
        except RuntimeError as exc:  # GridSampler's study.stop() only works inside optimize()
            if "Study.stop" not in str(exc):
                raise
    return True


def find(study: optuna.Study, number: int) -> FrozenTrial:
    storage = study._storage  # noqa: SLF001 (Optuna has no public number -> trial lookup)
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))  # noqa: SLF001


def beat(storage: Any, trial_ids: Callable[[], list[int]], interval: float,
         alive: Callable[[], bool] = lambda: True) -> Callable[[], None]:
    """Record a heartbeat for trial_ids() every `interval` s in a thread, while alive(), so other processes
    of the study see those trials live; returns the function that stops it."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        return lambda: None
    stop = threading.Event()

    def loop() -> None:
        while True:
            for trial_id in trial_ids() if alive() else []:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # a missed beat is harmless; the next one comes in `interval`
                    pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, daemon=True, name="optuna-heartbeat")
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join()

    return halt


class Pruned(Exception):
    """Raised in a job when its trial's pruner says stop, after `epoch` with objective `value`."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.value = epoch, value


class TrialEnded(Terminated):
    """The job's trial was ended by another process (found stale, say) while the job went on: the job stops
    and records nothing over what that process recorded."""


class TrialTimeout(Exception):
    """The trial ran longer than hydra.sweeper.trial_timeout: its own fault, so it fails (and counts)."""


class JobStopped(Exception):
    """What a job whose trial was interrupted (stalled) raises to its launcher: an Exception, so that Hydra
    hands it back as the job's failure and the sweep goes on (a BaseException would cross the launcher)."""


@functools.lru_cache(maxsize=4)
def _job_storage(url: str, heartbeat_interval: int, grace_period: int) -> Any:
    """One storage per worker process and study store: a reused worker opens (and checks the schema of)
    the database once, not once per trial."""
    return open_storage(url, heartbeat_interval, grace_period)


class JobTrial:
    """A job's handle on its own Optuna trial (the job runs apart from the sweeper, maybe in a worker
    process or on another machine): heartbeat while it makes progress, epochs reported for pruning, run
    ids left for the sweeper, and the result told by the job itself."""

    def __init__(self, study: str, storage: str, number: int, pruner: Any = None, heartbeat_interval: int = 5,
                 grace_period: int = 20, stall_timeout: float | None = None,
                 trial_timeout: float | None = None) -> None:
        from hydra.utils import instantiate

        pruner_obj = (instantiate(pruner, _execution_whitelist_=("optuna.pruners.*",)) if pruner
                      else optuna.pruners.NopPruner())
        self.storage = _job_storage(storage, heartbeat_interval, grace_period)
        # a job never samples: the study's own sampler lives in the sweeping process
        self.study = optuna.load_study(study_name=study, storage=self.storage, pruner=pruner_obj,
                                       sampler=optuna.samplers.RandomSampler())
        frozen = find(self.study, number)
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)  # noqa: SLF001 (no public number->id)
        self.number, self.stalls = number, frozen.system_attrs.get(STALLS, 0)
        self.attrs: dict[str, Any] = {}
        # without a pruner, should_prune is always False: not asking it saves a read of the trial per epoch
        self.prunes = not isinstance(pruner_obj, optuna.pruners.NopPruner)
        # a job started for a trial that has ended (e.g. SLURM requeued a job whose trial was interrupted and
        # retried as another one) has nothing to do
        self.ended = (None if frozen.state == TrialState.RUNNING else
                      f"{frozen.state.name}, {frozen.user_attrs.get('fail_reason', 'its result told')}")
        self.stall_timeout, self.trial_timeout = stall_timeout, trial_timeout
        self._started = self._last_step = time.monotonic()
        self._slowest = 0.0  # the longest gap between two steps so far
        self._stepped, self._stalled = False, ""
        self._stop_beat: Callable[[], None] = lambda: None
        if self.ended is None:
            self._stop_beat = beat(self.storage, lambda: [frozen._trial_id], heartbeat_interval,  # noqa: SLF001
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

    def stall_limit(self) -> float:
        if self.stall_timeout:
            return float(self.stall_timeout)
        return max(STALL_FLOOR, STALL_FACTOR * self._slowest) if self._stepped else STARTUP_STALL

    def _progressing(self) -> bool:
        """In the heartbeat thread: whether to beat. A job silent for its stall limit beats no more (so any
        sweep of the study finds its trial stale), marks its trial stalled and is stopped (Stalled raised in
        its main thread, which interrupts the trial: a blocking call returns to Python when signalled)."""
        if self._stalled:
            return False
        idle = time.monotonic() - self._last_step
        if idle <= self.stall_limit():
            return True
        self._stalled = f"no training step for {idle:.0f} s (its stall limit: {self.stall_limit():.0f} s)"
        log.error("trial %d: %s; stopping it", self.number, self._stalled)
        try:
            for key, value in {STALLED: True, "fail_reason": f"interrupted: {self._stalled}"}.items():
                self.storage.set_trial_user_attr(self.trial._trial_id, key, value)  # noqa: SLF001
        except Exception:  # noqa: BLE001 (the store may be why it stalled; its silence says enough)
            pass
        interrupt_main(Stalled(self._stalled))
        return False

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)
        with uninterrupted():
            for key, value in attrs.items():
                self.trial.set_user_attr(key, value)

    def should_prune(self, value: float, epoch: int) -> bool:
        """Report the epoch's objective (TrialEnded if another process has ended the trial meanwhile)."""
        with uninterrupted():
            try:
                self.trial.report(value, epoch)
            except optuna.exceptions.UpdateFinishedTrialError:
                raise TrialEnded(f"trial {self.number} was ended by another process "
                                 f"({find(self.study, self.number).user_attrs.get('fail_reason', 'finished')})")
            return self.prunes and self.trial.should_prune()

    def finish(self, value: float) -> None:
        """Tell the trial's result: PRUNED if the pruner stopped it, FAIL for a non-finite objective (never a
        result: NaN would be a trial's value, inf the best one), else COMPLETE."""
        with uninterrupted():
            if "pruned_at_epoch" in self.attrs:  # valued, as study.tell values it: the last reported objective
                end(self.study, self.number, TrialState.PRUNED, [float(value)] if math.isfinite(float(value)) else None)
            elif value is None or not math.isfinite(float(value)):
                end(self.study, self.number, TrialState.FAIL,
                    reason=self.attrs.get("fail_reason") or f"objective was {value}")
            else:
                end(self.study, self.number, TrialState.COMPLETE, [float(value)])

    def fail(self, exc: BaseException) -> None:
        """The job raised: its own failure (FAIL, counted), an interruption from outside or a stall (retried),
        or a fault of the environment (retried, and the sweep stops: faults.py)."""
        reason = f"{type(exc).__name__}: {exc}"
        fault = faults.classify(exc)
        if isinstance(exc, TrialEnded):
            return
        if isinstance(exc, Stalled) and self.stalls >= STALL_RETRIES:  # these parameters stall: count it
            args: dict[str, Any] = {"reason": f"{exc}; these parameters stalled {self.stalls + 1} times"}
        elif isinstance(exc, (Terminated, KeyboardInterrupt)):
            args = {"reason": f"interrupted: {reason}", "interrupted": True}
        elif fault is not None:
            args = {"reason": f"interrupted: {fault.kind}: {reason}", "interrupted": True,
                    ENVIRONMENT: fault.__dict__}
        else:
            args = {"reason": self.attrs.get("fail_reason") or reason}
        try:
            with uninterrupted():
                end(self.study, self.number, TrialState.FAIL, **args)
        except Exception as error:  # noqa: BLE001 (e.g. the disk is full: the sweep finds the trial silent)
            log.error("trial %d: its end could not be recorded (%s: %s); a sweep of the study finds it silent and "
                      "retries it", self.number, type(error).__name__, error)

    def close(self) -> None:
        self._stop_beat()
