"""Optuna trials as a sweep and its jobs share them, across any number of processes: the storage, a lock
per study, interrupted trials retried, and a job's handle on its own trial (heartbeat, pruning, result).

Who writes what: the sweeping process asks trials and launches jobs; each job tells its own trial's
result (so a result survives whatever happens to the process that launched it). A trial stopped from
outside (kill, SIGTERM, Ctrl-C, a lost heartbeat) is *interrupted*: FAIL with the reason, and a WAITING
copy with the same parameters is queued, which the next `ask()` of any process of the study takes. An
interrupted trial stays visible but does not count towards n_trials (see `counted`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

# Optuna marks storage heartbeats experimental and meant for study.optimize; we beat ourselves.
warnings.filterwarnings("ignore", message=r".*heartbeat", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# system attrs of a retry, named as Optuna's RetryHeartbeatStaleTrialCallback names them, so its
# retried_trial_number() and retry_history() read our retries too
RETRY_OF, RETRY_HISTORY = "failed_trial", "retry_history"
WORKER_DEATHS = "worker_died"  # a retry of a trial whose worker process died beside another (see sweeper)
SWEEPER_PID_ENV = "RESNET_SWEEP_SWEEPER_PID"  # set for jobs in worker processes that must end with the sweep


class Terminated(BaseException):
    """SIGTERM (SLURM's preemption notice) as an exception, so runs and trials are closed on the way out."""


_why_terminated: list[str] = []  # set before we SIGTERM ourselves, so the reason names the cause


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(_why_terminated[0] if _why_terminated else f"terminated by signal {signum}")


def install_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def open_storage(url: str, heartbeat_interval: int, grace_period: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> Any:
    """Optuna's RDB storage for `url`, with heartbeats (a RUNNING trial silent for grace_period seconds is
    stale) and, for SQLite, a busy timeout so parallel workers wait for each other instead of failing.
    The first opening creates Optuna's schema: do that under locks.store_lock (two processes at once collide)."""
    if not isinstance(url, str) or url.startswith("journal"):
        return url
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period, heartbeat_stale_trial_callback=on_stale)


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were interrupted and queued again."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that finished on their own (complete, pruned, or failed by their job): n_trials counts these."""
    again = retried(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in again]


def retry(study: optuna.Study, trial: FrozenTrial, reason: str, **system_attrs: Any) -> None:
    """Queue a WAITING copy of an interrupted trial: same parameters and sampler attributes (a grid cell
    keeps its grid_id), its own user attrs. Optuna's RetryHeartbeatStaleTrialCallback would also copy the
    user attrs (the old MLflow run id, the failure reason), which belong to the interrupted trial only."""
    attrs = {**trial.system_attrs, RETRY_OF: trial.system_attrs.get(RETRY_OF, trial.number),
             RETRY_HISTORY: [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number], **system_attrs}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=attrs,
        user_attrs={"retry_of": trial.number, "retry_reason": reason[:2000]}))


def end(study: optuna.Study, number: int, state: TrialState, values: list[float] | None = None,
        reason: str | None = None, interrupted: bool = False, **retry_attrs: Any) -> bool:
    """Finish trial `number` unless another process did first; True if this call finished it.

    An interrupted trial is FAIL and queued again with the same parameters (only by the process that
    failed it, so it is queued once)."""
    frozen = find(study, number)
    if frozen.state != TrialState.RUNNING:
        return False
    try:
        if reason:
            study._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", reason[:5000])  # noqa: SLF001
            if interrupted:
                study._storage.set_trial_user_attr(frozen._trial_id, "interrupted", True)  # noqa: SLF001
        if not study._storage.set_trial_state_values(frozen._trial_id, state, values):  # noqa: SLF001
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process (the job, the sweeper, a stale check) finished it first
    if interrupted:
        retry(study, frozen, reason or "interrupted", **retry_attrs)
    else:
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


def beat(storage: Any, trial_ids: Callable[[], list[int]], interval: float) -> Callable[[], None]:
    """Record a heartbeat for trial_ids() every `interval` s in a thread, so other processes of the
    study see those trials are alive; returns the function that stops it."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        return lambda: None
    stop = threading.Event()

    def loop() -> None:
        while True:
            for trial_id in trial_ids():
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


_job_running = threading.Event()  # set while a job trains in this process


_when_orphaned: list[Callable[[str], None]] = []


@contextmanager
def job_in_progress(when_orphaned: Callable[[str], None] | None = None) -> Iterator[None]:
    """Wraps a job: in a worker process of a sweep on this machine, the job ends with the sweep (below),
    and then `when_orphaned(reason)` runs (e.g. to end the dead sweep's MLflow parent run)."""
    _when_orphaned[:] = [when_orphaned] if when_orphaned else []
    _end_with_sweeper()
    _job_running.set()
    try:
        yield
    finally:
        _job_running.clear()


def _end_with_sweeper() -> None:
    """When the sweeping process dies (kill -9 included), stop the trial in progress as interrupted
    (SIGTERM to ourselves: the job closes its run and trial) and exit, instead of training on as an orphan
    that loky would keep for minutes. Started once per worker process; a no-op where the sweeper did not
    ask for it (jobs in the sweeping process itself, SLURM jobs that must outlive it)."""
    pid = int(os.environ.get(SWEEPER_PID_ENV, "0") or 0)
    if not pid or pid == os.getpid() or getattr(_end_with_sweeper, "started", False):
        return
    _end_with_sweeper.started = True  # type: ignore[attr-defined]
    parent = os.getppid()

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return os.getppid() == parent  # a worker's parent is the sweeper; an orphan gets init or a subreaper

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        reason = f"its sweeping process (pid {pid}) died"
        if _job_running.is_set():
            _why_terminated.append(reason)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 6
            while _job_running.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
        for callback in _when_orphaned:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 (best effort: the process is going anyway)
                pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="end-with-sweeper").start()


class Pruned(Exception):
    """Raised in a job when its trial's pruner says stop, after `epoch` with objective `value`."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch, self.value = epoch, value


class JobTrial:
    """A job's handle on its own Optuna trial (the job runs apart from the sweeper, maybe in a worker
    process or on another machine): heartbeat while it lives, epochs reported for pruning, run ids left
    for the sweeper, and the result told by the job itself."""

    def __init__(self, study: str, storage: str, number: int, pruner: Any = None, heartbeat_interval: int = 5,
                 grace_period: int = 20) -> None:
        from hydra.utils import instantiate

        pruner_obj = (instantiate(pruner, _execution_whitelist_=("optuna.pruners.*",)) if pruner
                      else optuna.pruners.NopPruner())
        self.storage = open_storage(storage, heartbeat_interval, grace_period)
        # a job never samples: the study's own sampler lives in the sweeping process
        self.study = optuna.load_study(study_name=study, storage=self.storage, pruner=pruner_obj,
                                       sampler=optuna.samplers.RandomSampler())
        frozen = find(self.study, number)
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)  # noqa: SLF001 (no public number->id)
        self.number = number
        self.attrs: dict[str, Any] = {}
        self._stop_beat = beat(self.storage, lambda: [frozen._trial_id], heartbeat_interval)  # noqa: SLF001

    def set(self, **attrs: Any) -> None:
        self.attrs.update(attrs)
        for key, value in attrs.items():
            self.trial.set_user_attr(key, value)

    def should_prune(self, value: float, epoch: int) -> bool:
        self.trial.report(value, epoch)
        return self.trial.should_prune()

    def finish(self, value: float) -> None:
        """Tell the trial's result: PRUNED if the pruner stopped it, FAIL for a non-finite objective (never a
        result: NaN would be a trial's value, inf the best one), else COMPLETE."""
        if "pruned_at_epoch" in self.attrs:
            end(self.study, self.number, TrialState.PRUNED)
        elif value is None or not math.isfinite(float(value)):
            end(self.study, self.number, TrialState.FAIL, reason=self.attrs.get("fail_reason") or f"objective was {value}")
        else:
            end(self.study, self.number, TrialState.COMPLETE, [float(value)])

    def fail(self, exc: BaseException) -> None:
        """The job raised: its own failure (FAIL, counted) or an interruption from outside (retried)."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            end(self.study, self.number, TrialState.FAIL, reason=f"interrupted: {reason}", interrupted=True)
        else:
            end(self.study, self.number, TrialState.FAIL, reason=self.attrs.get("fail_reason") or reason)

    def close(self) -> None:
        self._stop_beat()
