"""Faults for tests only, injected from outside the package: a Hydra callback that a test names on the
command line (`+hydra.callbacks.NAME._target_=fault_hooks.CLASS`, with tests/ on PYTHONPATH). Hydra runs
a callback's on_job_start in the job's own process (a sweep's worker), before the task."""

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
