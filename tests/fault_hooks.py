"""Faults for tests only, injected from outside the package: a Hydra callback that a test names on the
command line (`+hydra.callbacks.NAME._target_=fault_hooks.CLASS`, with tests/ on PYTHONPATH). Hydra runs
a callback's on_job_start in the job's own process (a sweep's worker), before the task, and its
on_multirun_start in the sweeping process. Two are not faults but make a test cheaper without changing
what it checks: SlowEpochs and LockWait."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class SigkillAfterFirstEpoch(Callback):
    """A job training with `seed` SIGKILLs its own process when its first epoch is done (at the epoch's
    validation), as the kernel's out-of-memory killer would."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if config.seed != self.seed:
            return
        from resnet_sweep import train  # in the job's process: torch is imported there anyway

        def evaluate(*args: Any, **kw: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)

        train.evaluate = evaluate  # fit() validates each epoch through it


class StopHoldingTheStudyLock(Callback):
    """A job training with `seed` takes the study database's write lock after its first epoch and stops
    itself (SIGSTOP) holding it, as a job stopped mid-write would: every other process of the study waits.
    Once: its retry (or another job with `seed`) trains, since a marker file in the working folder says so."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        marker = Path("stopped-holding-the-lock")
        if config.seed != self.seed or marker.exists():
            return
        marker.touch()
        import sqlite3

        from hydra.core.hydra_config import HydraConfig
        from resnet_sweep import stores, train

        database = stores.sqlite_file(str(HydraConfig.get().sweeper.storage))

        def evaluate(*args: Any, **kw: Any) -> Any:
            sqlite3.connect(database, isolation_level=None).execute("BEGIN EXCLUSIVE")
            os.kill(os.getpid(), signal.SIGSTOP)

        train.evaluate = evaluate


class ComposeFailsForTrial(Callback):
    """Trial `trial`'s config does not compose in a worker (Hydra's joblib launcher composes a job's config
    there, outside the task, and joblib answers a job that raises there by shutting down the whole pool);
    the job of trial `slow` waits `wait` s before its task, so it is in flight then. The sweeping process
    composes as usual, so the check before the study passes."""

    def __init__(self, trial: int, slow: int, wait: float) -> None:
        self.trial, self.slow, self.wait = trial, slow, wait

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in the worker with each job, before Hydra composes the job's config there."""
        self.__dict__.update(state)
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.errors import ConfigCompositionException

        original, trial = ConfigLoaderImpl.load_sweep_config, self.trial
        if getattr(original, "injected", False):
            return

        def load_sweep_config(loader: Any, master_config: Any, sweep_overrides: list[str]) -> Any:
            if f"sweep.trial={trial}" in sweep_overrides:
                raise ConfigCompositionException(f"injected: trial {trial}'s config does not compose")
            return original(loader, master_config, sweep_overrides)

        load_sweep_config.injected = True  # type: ignore[attr-defined]
        ConfigLoaderImpl.load_sweep_config = load_sweep_config  # type: ignore[method-assign]

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if config.sweep.trial == self.slow:
            import time

            time.sleep(self.wait)


class SlowEpochs(Callback):
    """The jobs of trials `trials` wait `seconds` before each evaluation (each epoch's validation, and a
    test): a job that must still be training when a test stops or preempts it, at little CPU (training
    that long would cost a core that the other tests need). Their retries, numbered after them, train at
    full speed: the wait ends with the job (on_job_end), also in a worker process that runs the next."""

    def __init__(self, trials: list[int], seconds: float) -> None:
        self.trials, self.seconds, self.original = list(trials), seconds, None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if config.sweep.trial not in self.trials:
            return
        import time

        from resnet_sweep import train

        self.original = original = train.evaluate
        seconds = self.seconds

        def slow(*args: Any, **kw: Any) -> Any:
            time.sleep(seconds)
            return original(*args, **kw)

        train.evaluate = slow

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if self.original is not None:
            from resnet_sweep import train

            train.evaluate, self.original = self.original, None


class LockWait(Callback):
    """SQLite's busy timeout (stores.LOCK_WAIT_S) of `seconds` in the sweeping process and every job: a test
    of a lock held past it waits that long, not a minute."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from resnet_sweep import stores

        stores.LOCK_WAIT_S = self.seconds

    on_job_start = on_multirun_start
