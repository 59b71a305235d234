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
