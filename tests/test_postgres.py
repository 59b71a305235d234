"""Scale-out on existing engines: two sweep processes share one Optuna study and one MLflow store on a
real PostgreSQL server (Debian's, started here on 127.0.0.1 in a temporary folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import services
from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def postgres() -> Iterator[str]:
    with services.postgres() as url:
        yield url


def test_two_sweeps_of_one_postgres_study_started_together_record_every_trial_once(postgres: str,
                                                                                     tmp_path: Path) -> None:
    # Sized so that the sweeps overlap: the first process migrates the fresh MLflow database (~15 s on
    # PostgreSQL) while the second waits on the lock, then starts its workers on cores the first one's
    # trials are using; 6 trials of 2 epochs on 256 images were all done by then (CI, 2026-11-29).
    args = ["-m", "trainer.epochs=4", "hydra.sweeper.n_trials=8",
            "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={postgres}/optuna",
            f"tracking.uri={postgres}/mlflow"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # started at the same moment on fresh databases: both create the schema, the study and its parent run
    procs = [subprocess.Popen([sys.executable, "-m", "resnet_sweep", *args], cwd=tmp_path, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    both = [log.read_text() for log in logs]
    launched = [len(re.findall(r"\] trial \d+ started: ", text)) for text in both]  # the sweeper logs each
    print("trials launched per process:", launched)
    assert all(launched)  # both processes ran trials of the study

    study = optuna.load_study(study_name="shared", storage=f"{postgres}/optuna")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == 8
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 8  # no duplicate parameter sets
    client = MlflowClient(f"{postgres}/mlflow")
    runs = client.search_runs([client.get_experiment_by_name("resnet_sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("role") != "sweep"]
    assert len(parents) == 1  # one parent run per study, shared by both processes
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == sorted(numbers)  # each trial once
    assert sorted(r.info.run_id for r in trials) == sorted(t.user_attrs["mlflow_run_id"] for t in study.trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    for r in trials:  # each run's recorded overrides name its own trial
        job_dir = Path(r.data.tags["hydra.job_dir"])
        assert job_dir.name == r.data.tags["optuna.trial"]
        assert f"sweep.trial={r.data.tags['optuna.trial']}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
