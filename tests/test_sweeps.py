"""Sweeps that resume, prune, run in parallel, survive faults: real processes, real stores, read back."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import (FAULT_HOOKS, alive, counted, job_runs, param_sets, parent_runs, run_cli, session_processes, start,
                      states, study, wait_for_epochs)

pytestmark = pytest.mark.slow
TINY = ("trainer.epochs=1", "data.train_subset=128")
FAST_HEARTBEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")


def test_the_job_knows_its_trial_and_trial_run_and_folder_find_each_other(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(workdir)
    for trial in s.trials:
        (run,) = [r for r in job_runs(workdir) if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.study"] == s.study_name
        job_dir = Path(run.data.tags["hydra.job_dir"])
        assert trial.user_attrs["job_dir"] == str(job_dir) and job_dir.name == str(trial.number)
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"sweep.trial={trial.number}" in overrides and f"sweep.study='{s.study_name}'" in overrides
    assert s.user_attrs["mlflow_parent_run_id"] == job_runs(workdir)[0].data.tags["mlflow.parentRunId"]


# The default launcher (joblib: 2 worker processes), 4 trials of 6 epochs: long enough to stop one mid-trial.
STOPPABLE = ("-m", "hydra.sweeper.n_trials=4", "trainer.epochs=6", "data.train_subset=512", *FAST_HEARTBEAT)


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM", "Ctrl-C"])
def test_a_stopped_sweep_leaves_nothing_behind_and_the_same_command_finishes_it_exactly(workdir: Path,
                                                                                        how: str) -> None:
    proc, log = start(workdir, *STOPPABLE)
    wait_for_epochs(log, "trial 1 started:", 2, proc)
    started = session_processes(proc)
    assert len(started) >= 3  # the sweep and its two workers at least
    if how == "kill -9":
        proc.kill()  # the sweeping process alone: its workers must notice
    elif how == "SIGTERM":
        proc.terminate()
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground process group
    code = proc.wait(timeout=60)
    assert code == {"kill -9": -9, "SIGTERM": 143, "Ctrl-C": 130}[how], log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(started) == [], f"{how}: processes alive 10 s after: {alive(started)}"
    (parent,) = parent_runs(workdir)
    assert parent.info.status == "KILLED"  # not left RUNNING by a process that ended
    assert "Traceback" not in log.read_text()
    interrupted = [t for t in study(workdir).trials if t.state.name == "FAIL"]
    assert interrupted and all("interrupted" in t.user_attrs["fail_reason"] for t in interrupted)

    res = run_cli(workdir, *STOPPABLE)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert [t.state.name for t in trials].count("RUNNING") == 0
    done = counted(trials)
    assert len(done) == 4 and {t.state.name for t in done} == {"COMPLETE"}
    assert len(set(param_sets(done))) == 4  # distinct: the rerun proposed new points, retried the stopped ones
    runs = job_runs(workdir)
    assert [r.info.status for r in runs].count("RUNNING") == 0
    assert {r.info.status for r in runs if r.data.tags.get("failure_reason")} <= {"KILLED"}
    (parent,) = parent_runs(workdir)
    assert parent.info.status == "FINISHED"
    print(f"{how}: exit {code}, processes alive 10 s later 0 of {len(started)}, after the rerun: "
          f"{len(done)} COMPLETE, {len(set(param_sets(done)))} distinct, {len(trials) - len(done)} interrupted")


def test_a_sweep_that_errors_while_launching_leaves_its_parent_run_failed_and_no_trial_running(
        workdir: Path) -> None:
    # joblib refuses this at its first Parallel call: the workers' start, then each trial's launch
    res = run_cli(workdir, "-m", *TINY, "hydra.sweeper.n_trials=2", "hydra.launcher.batch_size=nosuch")
    assert res.returncode != 0 and "batch_size must be 'auto' or a positive integer" in res.stderr
    assert "starting the workers failed" in res.stdout + res.stderr
    (parent,) = parent_runs(workdir)
    assert parent.info.status == "FAILED" and "nosuch" in parent.data.tags["failure_reason"]
    trials = study(workdir).trials
    assert "RUNNING" not in {t.state.name for t in trials} and counted(trials) == []  # interrupted, queued again


@pytest.mark.fresh
def test_an_unknown_joblib_backend_stops_the_sweep_before_any_trial_or_run(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "hydra.sweeper.n_trials=2", "hydra.launcher.backend=nosuch")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Error: hydra.launcher: Unsupported Joblib backend 'nosuch'. Supported backends: ['loky', 'multiprocessing']" \
        in res.stderr
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()  # refused before any store


def test_a_grid_killed_mid_run_trains_every_cell_exactly_once_after_the_rerun(workdir: Path) -> None:
    command = ("experiment=degradation", "-m", "trainer.epochs=8", "data.train_subset=256", "model.depth=choice(8,14)",
               "seed=choice(0,1)", "report=false", *FAST_HEARTBEAT)
    proc, log = start(workdir, *command)
    wait_for_epochs(log, "trial 3 started:", 3, proc)  # the second pair of cells, mid-training
    proc.kill()
    proc.wait()
    time.sleep(5)
    res = run_cli(workdir, *command)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name=study(workdir).study_name, storage=f"sqlite:///{workdir / 'optuna.db'}").trials
    done = counted(trials)
    cells = sorted((t.params["model.family"], t.params["model.depth"], t.params["seed"]) for t in done)
    assert cells == sorted((f, d, s) for f in ("plain", "resnet") for d in (8, 14) for s in (0, 1))
    assert {t.state.name for t in done} == {"COMPLETE"}, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert len(trials) > len(done)  # the killed cells are there too, interrupted


@pytest.mark.fresh
def test_two_identical_sweeps_started_together_in_a_fresh_folder(workdir: Path) -> None:
    command = ("-m", *TINY, "hydra.sweeper.n_trials=4")
    procs = [start(workdir, *command) for _ in range(2)]
    for proc, log in procs:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    trials = study(workdir).trials
    assert len(parent_runs(workdir)) == 1
    done = counted(trials)
    assert len(done) == 4 and len(set(param_sets(trials))) == len(trials)  # no duplicate parameter sets
    runs = {r.info.run_id: r for r in job_runs(workdir)}
    for t in trials:
        job_dir = Path(runs[t.user_attrs["mlflow_run_id"]].data.tags["hydra.job_dir"])
        assert job_dir.name == str(t.number)
        assert f"sweep.trial={t.number}" in (job_dir / ".hydra" / "overrides.yaml").read_text()


def test_a_job_killed_by_the_kernel_fails_its_trial_and_the_sweep_goes_on(workdir: Path) -> None:
    # the fault hook (tests/fault_hooks.py): a job with seed 1 SIGKILLs its own worker after its first epoch
    command = ("-m", "trainer.epochs=2", "data.train_subset=128", "search=none", "hydra/sweeper/sampler=grid",
               "seed=choice(0,1,2)", "+hydra.callbacks.fault._target_=fault_hooks.SigkillAfterFirstEpoch",
               "+hydra.callbacks.fault.seed=1")
    res = subprocess.run([sys.executable, "-m", "resnet_sweep", *command], cwd=workdir, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **FAULT_HOOKS})
    assert res.returncode == 0, res.stderr[-3000:]
    done = counted(study(workdir).trials)
    by_seed = {t.params["seed"]: t for t in done}
    assert sorted(by_seed) == [0, 1, 2] and len(done) == 3
    assert by_seed[1].state.name == "FAIL" and "worker process died" in by_seed[1].user_attrs["fail_reason"]
    assert by_seed[0].state.name == by_seed[2].state.name == "COMPLETE"
    runs = {r.info.run_id: r for r in job_runs(workdir)}
    assert runs[by_seed[1].user_attrs["mlflow_run_id"]].info.status == "FAILED"


def test_a_trial_whose_config_does_not_compose_in_its_worker_fails_alone_and_the_job_beside_it_runs_again(
        workdir: Path) -> None:
    # the fault hook (tests/fault_hooks.py): trial 2's config does not compose in its worker (the check before
    # the study passed), while trial 1's job waits in flight; joblib then shuts the pool down, and trial 1's job
    command = ("-m", "trainer.epochs=2", "data.train_subset=128", "search=none", "seed=choice(0,1,2,3)",
               "hydra.sweeper.n_trials=3", "+hydra.callbacks.fault._target_=fault_hooks.ComposeFailsForTrial",
               "+hydra.callbacks.fault.trial=2", "+hydra.callbacks.fault.slow=1", "+hydra.callbacks.fault.wait=8")
    res = subprocess.run([sys.executable, "-m", "resnet_sweep", *command], cwd=workdir, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **FAULT_HOOKS})
    assert res.returncode == 0 and "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    trials = {t.number: t for t in study(workdir).trials}
    seen = [(n, t.state.name, t.user_attrs.get("fail_reason")) for n, t in trials.items()]
    assert trials[2].state.name == "FAIL" and "injected" in trials[2].user_attrs["fail_reason"], seen
    assert trials[1].user_attrs.get("interrupted") and "stopped the worker pool" in trials[1].user_attrs["fail_reason"]
    # every job in flight beside it (trial 1; trial 0 too where it had not ended yet, on a loaded machine) was
    # interrupted, not failed, and ran again to the end with its parameters
    beside = [n for n, t in trials.items() if t.user_attrs.get("interrupted")]
    assert 1 in beside and set(beside) <= {0, 1}, seen
    for number in beside:
        (retry,) = [t for t in trials.values() if number in t.system_attrs.get("retry_history", [])]
        assert retry.state.name == "COMPLETE" and retry.params == trials[number].params, seen
    assert len(counted(trials.values())) == 3 and [t.number for t in counted(trials.values())
                                                   if t.state.name != "COMPLETE"] == [2], seen
    assert "RUNNING" not in {r.info.status for r in job_runs(workdir)}


def test_the_same_overrides_in_another_order_resume_the_same_study(workdir: Path) -> None:
    first = run_cli(workdir, "-m", "workers=serial", "trainer.epochs=1", "data.train_subset=128",
                    "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(workdir, "-m", "data.train_subset=128", "trainer.epochs=1", "hydra.sweeper.n_trials=2",
                    "workers=serial")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}")) == 1
    assert len(counted(study(workdir).trials)) == 2


def test_any_experiment_or_study_name_sweeps(workdir: Path) -> None:
    name = """a/b,c 'q' "d" ${x}"""
    res = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=1", "tracking.experiment='实验'",
                  "hydra.sweeper.study_name='a/b,c \\'q\\' \"d\" \\${x}'")
    assert res.returncode == 0, res.stderr[-3000:]
    (trial,) = study(workdir).trials
    assert study(workdir).study_name == name and trial.state.name == "COMPLETE"
    (run,) = job_runs(workdir, "实验")
    assert run.data.tags["optuna.study"] == name and run.info.status == "FINISHED"


def test_half_the_trials_diverge_and_the_sweep_goes_on(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "trainer.epochs=2", "data.train_subset=256", "search=none", "hydra/sweeper/sampler=grid",
                  "optimizer.lr=choice(1e9,0.05)", "seed=choice(0,1)")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert states(trials) == {"COMPLETE": 2, "FAIL": 2}, [(t.params, t.user_attrs) for t in trials]
    for t in trials:
        assert (t.state.name == "FAIL") == (t.params["optimizer.lr"] == 1e9)
        if t.state.name == "FAIL":
            assert "NonFiniteLoss" in t.user_attrs["fail_reason"]
    assert sorted(r.info.status for r in job_runs(workdir)) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]


def test_a_net_whose_statistics_diverge_with_a_finite_training_loss_is_never_a_complete_trial(
        workdir: Path) -> None:
    # lr 1e9 on 64 images: the training loss stays finite (5e18) but BatchNorm's statistics overflow
    res = run_cli(workdir, "-m", "workers=serial", "trainer.epochs=2", "data.train_subset=64", "optimizer.lr=1e9",
                  "hydra.sweeper.n_trials=1")
    assert res.returncode == 1, res.stderr[-3000:]
    (trial,) = study(workdir).trials
    assert trial.state.name == "FAIL" and "non-finite" in trial.user_attrs["fail_reason"]
    (run,) = job_runs(workdir)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["failure_reason"]


@pytest.mark.fresh
def test_a_sweep_refuses_to_select_on_the_test_set_before_anything_is_created(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *TINY, "objective=test_acc")
    assert res.returncode == 2
    assert "must not choose hyperparameters on the test set" in res.stdout + res.stderr
    assert "objective=val_acc" in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


def test_every_trial_failing_ends_with_a_summary_whose_advice_works(workdir: Path) -> None:
    command = ("-m", "workers=serial", "trainer.epochs=2", "data.train_subset=256", "hydra.sweeper.n_trials=2",
               "optimizer.lr=1e9")
    res = run_cli(workdir, *command)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "Sweep failed: none of its 2 trials completed" in out and "NonFiniteLoss" in out
    assert "Traceback" not in out
    (parent,) = parent_runs(workdir)
    assert parent.info.status == "FAILED"
    # the summary says a rerun of the same command adds nothing, and how to start anew: both hold
    again = run_cli(workdir, *command)
    assert again.returncode == 1 and len(study(workdir).trials) == 2
    advice = out.split("hydra.sweeper.study_name=", 1)[1].split()[0].rstrip(".")
    fixed = run_cli(workdir, "-m", "workers=serial", "trainer.epochs=1", "data.train_subset=128",
                    "hydra.sweeper.n_trials=2", f"hydra.sweeper.study_name={advice}")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert len(optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}")) == 2


def test_max_failure_rate_stops_the_sweep_with_the_summary(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "workers=serial", "data.train_subset=256", "search=none",
                  "hydra/sweeper/sampler=grid", "optimizer.lr=choice(1e9)", "seed=choice(0,1,2,3)", "trainer.epochs=2",
                  "hydra.sweeper.max_failure_rate=0.5")
    assert res.returncode == 1
    assert "more than hydra.sweeper.max_failure_rate=0.5" in res.stdout + res.stderr
    assert len(study(workdir).trials) == 1  # stopped after the first failure (1 of 1 > 0.5), not 4


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


@pytest.mark.parametrize("pruner", ["hyperband", "successive_halving"])
def test_the_bracket_pruners_prune_through_the_jobs_reports(workdir: Path, pruner: str) -> None:
    res = run_cli(workdir, "-m", "workers=serial", f"pruner={pruner}", "trainer.epochs=4", "data.train_subset=128",
                  "search=none", "hydra/sweeper/sampler=grid", "optimizer.lr=choice(0.05,1e-6)", "seed=choice(0,1,2)",
                  "hydra.sweeper.pruner.min_resource=1")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert len(trials) == 6 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # every job reported its epochs
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and all(max(t.intermediate_values) < 4 for t in pruned)  # stopped before the last epoch
    assert any(t.state.name == "COMPLETE" for t in trials if t.params["optimizer.lr"] == 0.05)
    (parent,) = parent_runs(workdir)
    assert parent.data.params["pruner"] == {"hyperband": "HyperbandPruner",
                                            "successive_halving": "SuccessiveHalvingPruner"}[pruner]


def test_seed_repeats_average_outside_the_search_space(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=1", "sweep.seeds=2")
    assert res.returncode == 0, res.stderr[-3000:]
    (trial,) = study(workdir).trials
    assert "seed" not in trial.params and len(trial.user_attrs["objective_per_seed"]) == 2
    runs = job_runs(workdir)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    values = [r.data.metrics["val_acc"] for r in runs]
    assert trial.value == pytest.approx(statistics.fmean(values))
    assert trial.user_attrs["objective_std"] == pytest.approx(statistics.stdev(values))


@pytest.mark.fresh
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


def test_trials_run_asynchronously_fast_ones_finish_while_a_slow_one_runs(workdir: Path) -> None:
    """With 2 workers, a slow first trial does not hold the other worker: trials 2 and 3 are asked and
    started as trial 1's worker frees, while trial 0 still trains (a batch of 2 would start them after it).
    One trial more than the workers is launched, waiting for the first free worker."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    queued = optuna.create_study(study_name="async", storage=storage, direction="maximize")
    for epochs in (60, 1, 1, 1):  # the sweep asks queued trials first, in this order
        queued.enqueue_trial({"trainer.epochs": epochs})
    res = run_cli(workdir, "-m", "search=none", "trainer.epochs=choice(1,60)", "hydra.sweeper.study_name=async",
                  "hydra.sweeper.n_trials=4", "hydra.launcher.n_jobs=2", "data.train_subset=512")
    assert res.returncode == 0, res.stderr[-3000:]
    slow, *fast = sorted(study(workdir).trials, key=lambda t: t.number)
    assert [t.params["trainer.epochs"] for t in (slow, *fast)] == [60, 1, 1, 1]
    assert all(t.state.name == "COMPLETE" for t in (slow, *fast))
    assert all(t.datetime_complete < slow.datetime_complete for t in fast)
    assert all(t.datetime_start < slow.datetime_complete for t in fast[1:])
    assert fast[1].datetime_start < fast[0].datetime_complete  # queued before a worker was free
    # end order differs from start order: the slow trial, started first, ended last
    assert sorted((slow, *fast), key=lambda t: t.datetime_complete)[-1].number == 0
    # the 2 workers were started (and had imported torch) before the sweep's run began, and trained every trial
    assert "starting 2 worker processes" in res.stdout + res.stderr
    assert len({t.user_attrs["job"] for t in (slow, *fast)}) == 2
    (parent,) = parent_runs(workdir)
    assert all(parent.info.start_time <= r.info.start_time for r in job_runs(workdir))
