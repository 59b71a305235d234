"""Shared helpers: run the real CLI in a scratch folder, compose configs like the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from resnet_sweep import presets

ROOT = Path(__file__).resolve().parent.parent


def run_cli(cwd: Path, *args: str, module: str = "resnet_sweep", timeout: int = 600,
            threads: str | None = "1") -> subprocess.CompletedProcess:
    """`python -m <module> args...` from `cwd`, which then holds outputs/, mlflow.db and optuna.db.
    `threads` is OMP_NUM_THREADS (None: unset, as a user's shell has it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": threads or ""}
    if threads is None:
        del env["OMP_NUM_THREADS"]
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def compose_config(*overrides: str):
    return presets.compose(list(overrides), job_name="test")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
