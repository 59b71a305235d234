"""The sweep benchmark runs a real sweep and reads its figures back from MLflow and Optuna (no timing is
asserted: speed is read from what the benchmark prints, never from a test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_the_sweep_benchmark_prints_a_row_of_figures_read_from_a_real_sweep(workdir: Path) -> None:
    res = run_cli(workdir, "--sweep", "--cases", "short", "--repeats", "1", "--workers", "2",
                  "data.train_subset=512", "trainer.epochs=2", "hydra.sweeper.n_trials=4",
                  module="resnet_sweep.bench")
    assert res.returncode == 0, res.stderr[-3000:]
    header, _, row = [line for line in res.stdout.splitlines() if line.startswith("|")]
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(names, (c.strip() for c in row.strip("|").split("|"))))
    print(row)
    assert cells["trials"] == "4"  # the last n_trials given wins
    # printed with 2 decimals: short trials can round "with start-up" down to 0.00 (seen: 1 epoch on 128 images)
    assert 0 < float(cells["efficiency"]) <= 1 and 0 <= float(cells["with start-up"]) <= float(cells["efficiency"])
    # 4 trials on 2 workers: one worker at least ran two, so the per-worker figure has a trial to measure
    assert math.isfinite(float(cells["in worker s/trial"])) and float(cells["in worker s/trial"]) > 0
    assert float(cells["overhead s/trial"]) > 0


def test_time_to_accuracy_runs_the_real_command_and_reads_each_epochs_test_accuracy_back(workdir: Path) -> None:
    common = ("--seeds", "0", "trainer.epochs=3", "model.depth=8")
    res = run_cli(workdir, "--time-to", "0.5", *common, module="resnet_sweep.bench")
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = [line for line in res.stdout.splitlines() if line.startswith("| 0 |")]
    _, seed, seconds, epoch, test_acc, _ = row.split("|")
    assert float(seconds) > 0 and 1 <= int(epoch) <= 3 and float(test_acc) >= 0.5
    assert "median" in res.stdout
    # a target no epoch reaches: said per seed, and the exit code says it too
    res = run_cli(workdir, "--time-to", "1.0", *common, "data.train_subset=64", module="resnet_sweep.bench")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "| 0 | not reached | - |" in res.stdout and "1 of 1 seeds did not reach 1.0" in res.stdout
