"""Sweeps that resume, prune, run in parallel, survive faults: real processes, real stores, read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow
TINY = ("trainer.epochs=1", "data.train_subset=128")
FAST_HEARTBEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")


def study(workdir: Path) -> optuna.Study:
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def job_runs(workdir: Path, experiment: str = "resnet_sweep") -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in found if r.data.tags.get("role") != "sweep"]


def states(trials) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def start(workdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"sweep-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resnet_sweep", *args], cwd=workdir, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no '{text}' in {timeout} s"
        time.sleep(0.2)


def test_the_job_knows_its_trial_and_trial_run_and_folder_find_each_other(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(workdir)
    for trial in s.trials:
        (run,) = [r for r in job_runs(workdir) if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.study"] == s.study_name
        job_dir = Path(run.data.tags["hydra.job_dir"])
        assert trial.user_attrs["job_dir"] == str(job_dir) and job_dir.name == str(trial.number)
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"sweep.trial={trial.number}" in overrides and f"sweep.study={s.study_name}" in overrides
    assert s.user_attrs["mlflow_parent_run_id"] == job_runs(workdir)[0].data.tags["mlflow.parentRunId"]


def test_kill_9_mid_epoch_then_the_same_command_finishes_the_study(workdir: Path) -> None:
    command = ("-m", "workers=serial", "hydra.sweeper.n_trials=3", "trainer.epochs=8", *FAST_HEARTBEAT)
    proc, log = start(workdir, *command)
    wait_for(log, "sweep.trial=1", proc)
    deadline = time.monotonic() + 60  # the second trial's second epoch: mid-trial, mid-sweep
    while log.read_text().split("sweep.trial=1", 1)[-1].count("epoch ") < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.state.name for t in study(workdir).trials}
    assert before == {0: "COMPLETE", 1: "RUNNING"}
    first_value = study(workdir).trials[0].value
    time.sleep(4)  # longer than grace_period: the dead sweep's heartbeat is stale
    res = run_cli(workdir, *command)
    assert res.returncode == 0, res.stderr[-3000:]
    after = study(workdir).trials
    assert states(after) == {"COMPLETE": 2, "FAIL": 1}  # exactly n_trials finished, none RUNNING
    assert after[0].state.name == "COMPLETE" and after[0].value == first_value  # the completed trial was kept
    assert after[1].state.name == "FAIL"
    runs = {r.info.run_id: r for r in job_runs(workdir)}
    killed = runs[after[1].user_attrs["mlflow_run_id"]]
    assert killed.info.status == "KILLED" and "stale" in killed.data.tags["failure_reason"]
    assert [r.info.status for r in runs.values()].count("RUNNING") == 0
    assert sorted(int(p.name) for p in workdir.glob("outputs/multiruns/*/*/[0-9]*")) == [0, 1, 2]  # numbering continues


def test_sigterm_kills_the_run_and_fails_the_trial(workdir: Path) -> None:
    proc, log = start(workdir, "-m", "workers=serial", "hydra.sweeper.n_trials=1", "trainer.epochs=30")
    wait_for(log, "epoch 2/30", proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    seconds = time.monotonic() - sent
    (trial,) = study(workdir).trials
    (run,) = job_runs(workdir)
    assert trial.state.name == "FAIL" and "Terminated" in trial.user_attrs["fail_reason"]
    assert run.info.status == "KILLED" and "Terminated" in run.data.tags["failure_reason"]
    print(f"SIGTERM -> run KILLED and trial FAIL within {seconds:.2f} s")


def test_half_the_trials_diverge_and_the_sweep_goes_on(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "trainer.epochs=2", "data.train_subset=256", "search=none", "hydra/sweeper/sampler=grid",
                  "optimizer.lr=choice(1e9,0.05)", "seed=choice(0,1)")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert states(trials) == {"COMPLETE": 2, "FAIL": 2}
    for t in trials:
        assert (t.state.name == "FAIL") == (t.params["optimizer.lr"] == 1e9)
        if t.state.name == "FAIL":
            assert "NonFiniteLoss" in t.user_attrs["fail_reason"]
    assert sorted(r.info.status for r in job_runs(workdir)) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]


def test_every_trial_failing_ends_with_a_summary_and_a_nonzero_exit(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "trainer.epochs=2", "data.train_subset=256", "hydra.sweeper.n_trials=2",
                  "optimizer.lr=1e9")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Sweep failed: none of the 2 trials" in out and "NonFiniteLoss" in out
    assert "Traceback" not in out


def test_pruned_trials_are_pruned_in_optuna_and_tagged_in_mlflow(workdir: Path) -> None:
    # hopeless trials by construction (lr 1e-5 learns nothing in 5 epochs) beside good ones (lr 0.05)
    res = run_cli(workdir, "-m", "workers=serial", "pruner=median", "trainer.epochs=5", "data.train_subset=256",
                  "search=none", "hydra/sweeper/sampler=grid", "optimizer.lr=choice(0.05,1e-5)", "seed=choice(0,1,2)",
                  "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner.n_startup_trials=1",
                  "hydra.sweeper.pruner.n_warmup_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and len(trials) == 6
    runs = {r.info.run_id: r for r in job_runs(workdir)}
    for t in pruned:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["pruned_at_epoch"] == str(t.user_attrs["pruned_at_epoch"])
        assert int(run.data.tags["pruned_at_epoch"]) < 5


def test_seed_repeats_average_outside_the_search_space(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "hydra.sweeper.n_trials=1", "sweep.seeds=2")
    assert res.returncode == 0, res.stderr[-3000:]
    (trial,) = study(workdir).trials
    assert "seed" not in trial.params and len(trial.user_attrs["objective_per_seed"]) == 2
    runs = job_runs(workdir)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert trial.value == pytest.approx(sum(r.data.metrics["val_acc"] for r in runs) / 2)
    assert trial.user_attrs["objective_std"] >= 0


def test_eight_parallel_joblib_jobs_on_a_fresh_project(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "workers=joblib", "hydra.launcher.n_jobs=8", "hydra.sweeper.n_trials=8")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert states(trials) == {"COMPLETE": 8}
    runs = job_runs(workdir)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(r.info.run_id for r in runs)
    assert [p.name for p in workdir.rglob("*.db") if p.name.startswith("mlflow")] == ["mlflow.db"]


def test_submitit_local_launcher_runs_the_sweep(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "workers=serial", "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2",
                  "hydra.launcher.timeout_min=5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert states(study(workdir).trials) == {"COMPLETE": 2}
    assert {r.info.status for r in job_runs(workdir)} == {"FINISHED"}
