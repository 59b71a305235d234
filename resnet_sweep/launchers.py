"""The Hydra launchers a sweep runs its trials with, told apart in this one place: in this process
(Hydra's basic launcher, joblib with one job), in reused worker processes (hydra-joblib-launcher), or as
cluster jobs (hydra-submitit-launcher); and what each raises for a job that died (workers.stop_job
stops one). Standard APIs throughout but for the two private names of hydra-joblib-launcher and loky
listed in PRIVATE, each with why (tests/test_house.py fails the day an upgrade removes one).
"""

from __future__ import annotations

import gc
import os
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

INLINE, WORKERS, CLUSTER = "inline", "workers", "cluster"
PRIVATE = {
    # the launcher's own check of its settings, run before any study exists (it runs at its first launch)
    "hydra_plugins.hydra_joblib_launcher._core.process_joblib_cfg": "check",
    # loky's pool, reused across launches: terminated at once when a sweep ends or is interrupted
    "joblib.externals.loky.reusable_executor._executor": "stop",
    # what a job in flight meets when joblib shuts the shared pool down because another job raised outside
    # its task (joblib aborts every job of the pool; loky exports no name for it)
    "joblib.externals.loky.process_executor.ShutdownExecutorError": "pool_shut_down",
}


def kind(launcher: Any) -> str:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    if _joblib(launcher):  # joblib runs n_jobs=1 in the calling thread
        from joblib import effective_n_jobs

        return WORKERS if effective_n_jobs(launcher.joblib.get("n_jobs")) > 1 else INLINE
    return CLUSTER if isinstance(launcher, BaseSubmititLauncher) else INLINE


def parallel(launcher: Any, n_jobs: int | None) -> int:
    """Trials that train at once: hydra.sweeper.n_jobs where set, else joblib's worker processes, else one."""
    if n_jobs:
        return n_jobs
    if kind(launcher) == WORKERS:
        from joblib import effective_n_jobs

        return effective_n_jobs(launcher.joblib.get("n_jobs"))
    return 1


def _joblib(launcher: Any) -> bool:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    return isinstance(launcher, JoblibLauncher)


def _joblib_settings(launcher: Any) -> dict[str, Any]:
    """The launcher's Parallel arguments as it makes them (ValueError for settings it refuses)."""
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg  # see PRIVATE

    settings = dict(launcher.joblib)
    process_joblib_cfg(settings)
    return settings


def check(launcher: Any) -> str | None:
    """What is wrong with the launcher's settings, found before any study exists; None if nothing."""
    if not _joblib(launcher):
        return None
    if launcher.joblib.get("timeout") is not None:
        return (f"hydra.launcher.timeout={launcher.joblib.get('timeout')} is joblib's: when one trial passes it, "
                f"joblib stops every worker, and the sweep with them. For a time limit per trial use "
                f"hydra.sweeper.trial_timeout=SECONDS, for the whole sweep hydra.sweeper.timeout=SECONDS")
    try:
        _joblib_settings(launcher)
    except ValueError as exc:
        return f"hydra.launcher: {exc}"
    return None


def warm(launcher: Any, n: int, task: Callable[[], Any]) -> Callable[[], BaseException | None]:
    """Start joblib's n worker processes now, each running `task` (the imports a job needs), in a thread;
    returns a wait() for them (the error, if starting failed). Our own because hydra-joblib-launcher has
    no start-up hook: it starts its workers at its first launch, inside the first trial. It calls
    Parallel with the launcher's own arguments, so loky reuses these very workers for every trial."""
    from joblib import Parallel, delayed

    done, failed = threading.Event(), []
    settings = _joblib_settings(launcher) if kind(launcher) == WORKERS else {}
    if settings.get("backend") != "loky" or settings.pop("inner_max_num_threads", None) is not None:
        return lambda: None  # no pool of ours to start: the launcher starts it

    def start() -> None:
        try:
            Parallel(**settings)(delayed(task)() for _ in range(n))
        except BaseException as exc:  # noqa: BLE001 (the first trial meets the same problem and reports it)
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=start, name="warm-workers", daemon=True).start()

    def wait() -> BaseException | None:
        while not done.wait(0.5):  # in slices: Ctrl-C and SIGTERM reach the waiting thread
            pass
        return failed[0] if failed else None

    return wait


def stop(launcher: Any) -> None:
    """Terminate joblib's worker processes now: when the sweep is interrupted, the threads waiting on them
    return and nothing trains on; when it is done, the command ends without waiting ~3 s a worker for them
    to exit. (joblib's MemmappingExecutor: terminate also removes its temporary files.)"""
    if kind(launcher) == WORKERS:
        from joblib.externals.loky import reusable_executor

        if reusable_executor._executor is not None:  # noqa: SLF001 (see PRIVATE)
            reusable_executor._executor.terminate(kill_workers=True)  # noqa: SLF001


def worker_died(exc: BaseException | None) -> bool:
    """A joblib worker process died (killed by the kernel, or by the sweep): loky raises this for every job
    of its pool, which it restarts."""
    return isinstance(exc, BrokenProcessPool)


def pool_shut_down(exc: BaseException) -> bool:
    """A job in flight stopped because joblib shut the pool down (see PRIVATE): through no fault of its own."""
    from joblib.externals.loky.process_executor import ShutdownExecutorError  # see PRIVATE

    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ShutdownExecutorError):
        seen = seen.__cause__ or seen.__context__
    return seen is not None


def job_lost(exc: BaseException) -> str | None:
    """A cluster job that left no result: 'interrupted' (cancelled, preempted, killed: it runs again),
    'failed' (it raised outside the task), or None when `exc` is not submitit's."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    return "interrupted" if isinstance(exc, UncompletedJobError) else "failed" if isinstance(exc, FailedJobError) else None


def warm_up() -> int:
    """In a fresh launcher worker, before its first job: import what every job needs (torch, torch._dynamo,
    which the first optimizer imports, MLflow's SQL store, Optuna, Hydra's plugins: ~9 s of CPU on a
    2-core Xeon), so that the first trial starts training at once. Returns this worker's pid. Not
    scikit-learn (~2.5 s of CPU more): the digits are read from their cached split (data.py); only a job
    that makes that split (once per user and scikit-learn version) imports it, inside its trial.

    Then freezes what those imports made (gc.freeze: ~600,000 objects the garbage collector no longer
    scans). Why: without psutil, loky calls gc.collect() after every task that ends a second or more after
    the last, and a full collection over them took 0.3-0.37 s here: that much idle time per trial."""
    import alembic.command  # noqa: F401 (MLflow's schema check, when a job first opens the store)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import sqlalchemy.dialects.sqlite  # noqa: F401
    import torch._dynamo  # noqa: F401
    from hydra.core.plugins import Plugins

    import resnet_sweep.job  # noqa: F401

    Plugins.instance()  # Hydra finds (imports) its plugins, else in the first job: ~0.1 s with the imports above

    gc.collect()
    gc.freeze()
    return os.getpid()
