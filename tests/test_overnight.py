"""Sweeps you can leave overnight: every sweep ends, a passing fault of the environment never spends the
study, a bad value never poisons it. Real processes and real stores: a worker stopped with SIGSTOP, a job
blocked on I/O, a real `mlflow server` killed and started again, stores on a small tmpfs, damaged pages."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import services
from mlflow import MlflowClient

from resnet_sweep import stores
from conftest import FAULT_HOOKS, counted, job_runs, parent_runs, run_cli, start, study, wait_for, wait_for_epochs

pytestmark = pytest.mark.slow
FAST_HEARTBEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
TINY = ("trainer.epochs=1", "data.train_subset=128")
# SQLite's busy timeout (stores.LOCK_WAIT_S) of 20 s, not a minute, in the sweep and its jobs (tests/fault_hooks.py)
LOCK_WAIT = ("+hydra.callbacks.wait._target_=fault_hooks.LockWait", "+hydra.callbacks.wait.seconds=20")


def no_running(workdir: Path, uri: str | None = None) -> None:
    """The study and the MLflow store hold no RUNNING trial and no RUNNING run."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    for summary in optuna.get_all_study_summaries(storage):
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
        assert [t.number for t in trials if t.state.name == "RUNNING"] == [], summary.study_name
    client = MlflowClient(uri or f"sqlite:///{workdir / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(ids) if r.info.status == "RUNNING"] == []


def interrupted(trials) -> list:  # noqa: ANN001
    return [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("interrupted")]


def pid_of_trial(workdir: Path, number: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """The process that trains trial `number` (its job records it as soon as it starts). The limit is for a
    loaded machine: CI runs four tests at once on two cores, and the sweep's workers import torch first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before trial {number} started"
        if (workdir / "optuna.db").exists() and optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}"):
            found = [t for t in study(workdir).trials if t.number == number and "job_process" in t.user_attrs]
            if found:
                return int(found[0].user_attrs["job_process"]["pid"])
        time.sleep(0.2)
    raise AssertionError(f"trial {number} did not start in {timeout} s")


def snapshot(uri: str) -> dict[str, tuple]:
    """Every ended run: status, end time, tags and how many epochs it recorded."""
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: (r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())),
                            len(client.get_metric_history(r.info.run_id, "val_acc")))
            for r in client.search_runs(ids) if r.info.status != "RUNNING"}


def test_a_stopped_worker_is_killed_its_trial_retried_and_the_sweep_ends(workdir: Path) -> None:
    proc, log = start(workdir, "-m", "hydra.sweeper.n_trials=4", "trainer.epochs=30", "data.train_subset=256",
                      *FAST_HEARTBEAT, *LOCK_WAIT, env=FAULT_HOOKS)
    worker = pid_of_trial(workdir, 0, proc)
    wait_for_epochs(log, "trial 0 started:", 2, proc)
    os.kill(worker, signal.SIGSTOP)  # stopped mid-trial: alive, silent, never progressing
    stopped = time.monotonic()
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    took = time.monotonic() - stopped
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
    trials = study(workdir).trials
    (zero,) = [t for t in trials if t.number == 0]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    # silent (no heartbeat), or killed after LOCK_WAIT where it was stopped holding the store's lock
    assert zero.state.name == "FAIL" and re.search("no heartbeat|held a store's lock", retry.user_attrs["retry_reason"])
    assert len(counted(trials)) == 4 and {t.state.name for t in counted(trials)} == {"COMPLETE"}, (
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials], log.read_text()[-5000:])
    runs = {r.data.tags["optuna.trial"]: r for r in job_runs(workdir)}
    assert runs["0"].info.status == "KILLED"
    no_running(workdir)
    assert "Traceback" not in log.read_text()
    print(f"SIGSTOP of trial 0's worker: the sweep ended {took:.0f} s later, exit 0, 4 COMPLETE")


def test_a_worker_stopped_holding_the_study_lock_is_killed_and_the_sweep_ends(workdir: Path) -> None:
    # the fault hook (tests/fault_hooks.py): the job with seed 1 takes optuna.db's write lock after its first
    # epoch and stops itself (SIGSTOP) holding it, once; every other process of the study waits for the lock
    command = ("-m", "trainer.epochs=2", "data.train_subset=128", "search=none", "hydra/sweeper/sampler=grid",
               "seed=choice(0,1,2)", "+hydra.callbacks.fault._target_=fault_hooks.StopHoldingTheStudyLock",
               "+hydra.callbacks.fault.seed=1", *LOCK_WAIT)
    began = time.monotonic()
    proc, log = start(workdir, *command, env=FAULT_HOOKS)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    trials = study(workdir).trials
    done = counted(trials)
    seen = ([(t.number, t.params.get("seed"), t.state.name, t.user_attrs.get("fail_reason")) for t in trials],
            log.read_text()[-3000:])  # what a failure below shows
    assert sorted(t.params["seed"] for t in done) == [0, 1, 2] and {t.state.name for t in done} == {"COMPLETE"}, seen
    held = [t for t in trials if "held a store's lock" in str(t.user_attrs.get("fail_reason"))]
    assert len(held) == 1, seen
    (held,) = held
    assert held.params["seed"] == 1 and held.state.name == "FAIL" and held.number not in {t.number for t in done}, seen
    assert "Traceback" not in log.read_text(), seen
    no_running(workdir)
    print(f"a worker stopped holding optuna.db's lock: killed, the sweep done in {time.monotonic() - began:.0f} s")


def test_a_job_blocked_on_io_is_stopped_at_its_stall_limit_and_retried(workdir: Path) -> None:
    # trial 0's job writes its config into its folder first: a FIFO there blocks that write forever, as a
    # hung network file system would, while the process and its heartbeat thread live on
    (workdir / "sweep" / "0").mkdir(parents=True)
    os.mkfifo(workdir / "sweep" / "0" / "config_resolved.yaml")
    began = time.monotonic()
    res = run_cli(workdir, "-m", "trainer.epochs=2", "data.train_subset=128", "hydra.sweeper.n_trials=2",
                  "hydra.sweep.dir=sweep", "hydra.sweeper.stall_timeout=10", *FAST_HEARTBEAT)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    (zero,) = [t for t in trials if t.number == 0]
    assert zero.state.name == "FAIL" and zero.user_attrs["interrupted"]
    assert "no training step for" in zero.user_attrs["fail_reason"]
    assert len(counted(trials)) == 2 and {t.state.name for t in counted(trials)} == {"COMPLETE"}
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.params == zero.params and retry.state.name == "COMPLETE"
    runs = {r.data.tags["optuna.trial"]: r for r in job_runs(workdir)}
    assert runs["0"].info.status == "KILLED" and "no training step" in runs["0"].data.tags["failure_reason"]
    no_running(workdir)
    print(f"blocked job: stopped and retried, the sweep done in {time.monotonic() - began:.0f} s")


def test_parameters_that_stall_three_times_count_as_failed_and_the_sweep_ends(workdir: Path) -> None:
    for number in range(3):  # the trial and both of its retries block
        (workdir / "sweep" / str(number)).mkdir(parents=True)
        os.mkfifo(workdir / "sweep" / str(number) / "config_resolved.yaml")
    res = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=sweep",
                  "hydra.sweeper.stall_timeout=15", *FAST_HEARTBEAT)  # above the first job's imports, loaded
    assert res.returncode == 1, res.stderr[-3000:]  # the one trial failed: "none of its 1 trials completed"
    trials = sorted(study(workdir).trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL"]
    assert [bool(t.user_attrs.get("interrupted")) for t in trials] == [True, True, False]
    assert "stalled 3 times" in trials[2].user_attrs["fail_reason"]
    assert "Sweep failed: none of its 1 trials completed" in res.stderr + res.stdout
    no_running(workdir)


def stop_between_writes(pid: int, workdir: Path) -> None:
    """SIGSTOP `pid` at a moment it holds no lock on the folder's stores (stopped mid-write, it would block
    every other process of the study: test_a_worker_stopped_holding_the_study_lock_... is about that)."""
    while True:
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)
        if pid not in {p for db in ("optuna.db", "mlflow.db") for p in stores.lock_holders(f"sqlite:///{workdir / db}")}:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


def wait_for_a_write(workdir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until trial 0's run holds an epoch in the store: its job's writes come WRITE_EVERY_S apart, so a stop
    right after one lands between writes, not in the moment between a write's check that the run still
    runs and its batch (a window a stop can only hit there, which a lock-free check cannot close)."""
    client, deadline = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), time.monotonic() + timeout
    while True:
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string="tags.`optuna.trial` = '0'") if ids else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val_acc"):
            return
        assert proc.poll() is None and time.monotonic() < deadline, "trial 0's run recorded no epoch"
        time.sleep(0.05)


def test_a_job_that_wakes_after_its_trial_was_settled_records_nothing_over_it(workdir: Path) -> None:
    command = ("-m", "workers=serial", "trainer.epochs=40", "data.train_subset=512", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.study_name=S", *FAST_HEARTBEAT)
    first, log = start(workdir, *command)
    wait_for_epochs(log, "trial 0 started:", 3, first)
    wait_for_a_write(workdir, first)
    stop_between_writes(first.pid, workdir)  # the sweep and its job (serial: one process) stop mid-trial
    try:
        second = run_cli(workdir, *command)  # finds trial 0 silent, retries it elsewhere, finishes the study
        assert second.returncode == 0, second.stderr[-3000:]
        before = snapshot(f"sqlite:///{workdir / 'mlflow.db'}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "ended by another process" in log.read_text()
    after = snapshot(f"sqlite:///{workdir / 'mlflow.db'}")
    jobs = {r.info.run_id for r in job_runs(workdir)}  # (the study's own run ends again with the first sweep)
    assert {k: after[k] for k in before if k in jobs} == {k: v for k, v in before.items() if k in jobs}  # unchanged
    (zero,) = [r for r in job_runs(workdir) if r.data.tags["optuna.trial"] == "0"]
    assert zero.info.status == "KILLED"
    no_running(workdir)


class Server:
    """A real `mlflow server` on SQLite that a test stops and starts again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self._stack = folder, services.free_port(), ExitStack()
        self.url = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._stack.enter_context(services.mlflow_server(f"sqlite:///{self.folder / 'srv.db'}", self.folder, self.port))

    def down(self) -> None:
        self._stack.close()


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "server")
    server.up()
    try:
        yield server
    finally:
        server.down()


def test_the_tracking_server_down_stops_the_sweep_and_the_same_command_finishes_once_it_is_back(
        workdir: Path, tracking_server: Server) -> None:
    url = tracking_server.url
    command = ("-m", "trainer.epochs=20", "data.train_subset=512", "hydra.sweeper.n_trials=2", f"tracking.uri={url}")
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # minutes by default
    proc, log = start(workdir, *command, env=env)
    wait_for_epochs(log, "trial 1 started:", 3, proc)
    tracking_server.down()
    stopped = time.monotonic()
    code = proc.wait(timeout=600)
    took = time.monotonic() - stopped
    out = log.read_text()
    assert code == 75, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"store unreachable: tracking.uri={url}" in error[0]
    assert "Start the server" in error[0] and "run the same command again" in error[0]
    assert "Traceback" not in out
    trials = study(workdir).trials
    assert counted(trials) == [] and len(interrupted(trials)) == 2  # neither counted: both run again
    assert [t.state.name for t in trials].count("RUNNING") == 0

    tracking_server.up()
    again = run_cli(workdir, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study(workdir).trials
    assert len(counted(trials)) == 2 and {t.state.name for t in counted(trials)} == {"COMPLETE"}
    no_running(workdir, url)
    print(f"tracking server down: the sweep ended {took:.0f} s later (exit 75); the rerun finished the study")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (mounting needs root, as CI has)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs (CI runs as root)")
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave_kb: int) -> Path:
    free_kb = shutil.disk_usage(folder).free // 1024
    filler = folder / "filler"
    with filler.open("ab") as f:
        f.write(b"\0" * max(0, free_kb - leave_kb) * 1024)
    return filler


def test_a_full_disk_interrupts_the_trials_and_the_same_command_finishes_once_there_is_space(
        small_disk: Path) -> None:
    warm = run_cli(small_disk, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=1",
                   "hydra.sweeper.study_name=first")
    assert warm.returncode == 0, warm.stderr[-3000:]  # both stores exist, with a study in each
    filler = fill(small_disk, 300)
    command = ("-m", "trainer.epochs=15", "data.train_subset=512", "hydra.sweeper.n_trials=2")
    res = run_cli(small_disk, *command)
    out = res.stdout + res.stderr
    assert res.returncode == 75, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "disk full:" in error[0] and "free): " in error[0] and "Free some space" in error[0]
    assert "Traceback" not in out
    name = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{small_disk / 'optuna.db'}")
            if s.study_name != "first"][0]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{small_disk / 'optuna.db'}").trials
    assert counted(trials) == []  # the disk's fault: nothing counted

    filler.unlink()
    again = run_cli(small_disk, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{small_disk / 'optuna.db'}").trials
    assert len(counted(trials)) == 2 and {t.state.name for t in counted(trials)} == {"COMPLETE"}
    assert [t.state.name for t in trials].count("RUNNING") == 0
    client = MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    assert [r for r in client.search_runs(["1"]) if r.info.status == "RUNNING"] == []


@pytest.mark.parametrize("leave_kb", [60, 400])
def test_a_disk_too_full_for_the_stores_is_one_paragraph_and_leaves_no_partial_file(small_disk: Path,
                                                                                     leave_kb: int) -> None:
    filler = fill(small_disk, leave_kb)
    res = run_cli(small_disk, "-m", *TINY, "hydra.sweeper.n_trials=2")
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 75, out[-3000:]
    assert out.splitlines()[-1].startswith("Error: sweep stopped by a fault of the environment, disk full:")
    assert "Traceback" not in out and len([line for line in out.splitlines() if "rror" in line]) == 1, out
    assert not list(small_disk.glob(".*.creating-*"))
    filler.unlink()
    again = run_cli(small_disk, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=2")
    assert again.returncode == 0, again.stderr[-3000:]


BAD_SPACES = {  # the swept value, words the message must have
    "unknown choice": ("model.activation=choice(relu,nosuch)", ["model.activation=nosuch", "expected one of"]),
    "interval reaching below 0": ("optimizer.lr=interval(-1,1)", ["optimizer.lr=interval(-1,1)", "lower bound",
                                                                   "must be > 0"]),
    "an interval with its bounds swapped": ("optimizer.lr=interval(1,1e-3)", ["optimizer.lr=interval(1,1e-3)",
                                                                            "lower bound first"]),
    "negative choices": ("optimizer.lr=choice(-0.5,-0.1)", ["optimizer.lr=-0.5", "must be > 0"]),
    "a depth that is not 6n+2": ("model.depth=choice(8,33)", ["model.depth=33", "6n+2"]),
    "an interval over a whole-number key": ("trainer.batch_size=tag(log,interval(16,256))", [
        "trainer.batch_size=tag(log,interval(16,256)) gives floats", "'trainer.batch_size=tag(log,int(interval(16,256)))'"]),
    "zero epochs in a range": ("trainer.epochs=range(0,3)", ["trainer.epochs=0", "must be > 0"]),
    "a log interval from 0": ("optimizer.lr=tag(log,interval(0,1))", ["optimizer.lr=tag(log,interval(0,1))",
                                                                      "log interval starts above 0"]),
    "an unknown group option": ("model=choice(resnet20,nosuch)", ["model=nosuch", "resnet56"]),
    "a typo in a key": ("model.activaton=choice(relu,tanh)", ["model.activaton", "Did you mean"]),
    "joblib's own timeout": ("hydra.launcher.timeout=4", ["hydra.launcher.timeout", "hydra.sweeper.trial_timeout"]),
    "no trials": ("hydra.sweeper.n_trials=0", ["hydra.sweeper.n_trials=0", ">= 1"]),
    "an unknown sweeper setting": ("+hydra.sweeper.nosuch=1", ["hydra.sweeper.nosuch", "trial_timeout"]),
}


@pytest.mark.fresh
@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_value_that_can_never_train_is_refused_before_the_study_in_one_line(workdir: Path, case: str) -> None:
    override, words = BAD_SPACES[case]
    res = run_cli(workdir, "-m", "data.train_subset=128", "hydra.sweeper.n_trials=1", override)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2, out[-3000:]
    assert out.startswith("Error: ") and len(out.splitlines()) == 1 and "Traceback" not in out, out[-3000:]
    assert all(w in out for w in words), out
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


def test_combinations_that_train_are_not_refused_and_a_config_failing_at_run_time_fails_alone(
        workdir: Path) -> None:
    # ImageNet-layout depth 18 trains only with layout imagenet: the pair is allowed; digits trains, and
    # MNIST, whose files are missing here, fails its own trials at run time and marks no other
    res = run_cli(workdir, "-m", "workers=serial", "search=none", "hydra/sweeper/sampler=grid", *TINY,
                  "data.download=false",
                  f"data.root={workdir / 'nothing'}", "data=choice(digits,mnist)", "seed=choice(0,1)")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert len(trials) == 4 and interrupted(trials) == []
    for t in trials:
        assert t.state.name == ("COMPLETE" if t.params["data"] == "digits" else "FAIL"), (t.params, t.user_attrs)
        if t.params["data"] == "mnist":
            assert "DataUnavailable" in t.user_attrs["fail_reason"]
    pairs = run_cli(workdir, "-m", "workers=serial", "search=none", "hydra/sweeper/sampler=grid", *TINY,
                    "hydra.sweeper.study_name=pairs",
                    "model.layout=choice(cifar,imagenet)", "model.depth=choice(20,18)", "model.stem=small")
    assert pairs.returncode == 0, pairs.stderr[-3000:]
    trials = optuna.load_study(study_name="pairs", storage=f"sqlite:///{workdir / 'optuna.db'}").trials
    ok = {("cifar", 20), ("imagenet", 18)}
    assert {(t.params["model.layout"], t.params["model.depth"]): t.state.name for t in trials} == {
        (layout, depth): "COMPLETE" if (layout, depth) in ok else "FAIL" for layout in ("cifar", "imagenet")
        for depth in (20, 18)}


def test_a_changed_search_space_is_refused_or_continued_on_purpose_and_recorded(workdir: Path) -> None:
    base = ("-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=X")
    assert run_cli(workdir, *base, "optimizer.lr=interval(0.01,0.1)").returncode == 0
    before = snapshot(f"sqlite:///{workdir / 'mlflow.db'}")
    changed = run_cli(workdir, *base, "optimizer.lr=interval(0.5,1.0)")
    out = (changed.stdout + changed.stderr).strip().splitlines()
    assert changed.returncode == 2 and out[-1].startswith("Error: study 'X' was swept over another search space")
    assert "optimizer.lr interval(0.01, 0.1) -> interval(0.5, 1.0)" in out[-1] and "Traceback" not in changed.stderr
    assert snapshot(f"sqlite:///{workdir / 'mlflow.db'}") == before  # nothing written
    # the advice: on purpose, in this study
    on_purpose = ("optimizer.lr=interval(0.5,1.0)", "hydra.sweeper.allow_space_change=true", "hydra.sweeper.n_trials=2")
    again = run_cli(workdir, *base, *on_purpose)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(counted(study(workdir).trials)) == 2
    (parent,) = parent_runs(workdir)
    assert parent.data.tags["commands"].count("\n") == 1 and "allow_space_change" in parent.data.tags["commands"]
    assert "interval(0.01, 0.1)" in parent.data.tags["search_spaces"]
    assert "interval(0.5, 1.0)" in parent.data.tags["search_spaces"]
    # the other advice: a new study
    advice = out[-1].split("hydra.sweeper.study_name=", 1)[1].split(")")[0]
    fresh = run_cli(workdir, *base[:-1], f"hydra.sweeper.study_name={advice}", "optimizer.lr=interval(0.5,1.0)")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    # a choice's values cannot change in one study, even on purpose: refused, and the finished study untouched
    assert run_cli(workdir, *base[:-1], "hydra.sweeper.study_name=Y", "model.activation=choice(relu,tanh)").returncode == 0
    before = snapshot(f"sqlite:///{workdir / 'mlflow.db'}")
    other = run_cli(workdir, *base[:-1], "hydra.sweeper.study_name=Y", "model.activation=choice(relu,elu)",
                    "hydra.sweeper.allow_space_change=true")
    last = (other.stdout + other.stderr).strip().splitlines()[-1]
    assert other.returncode == 2 and last.startswith("Error: study 'Y' sweeps model.activation=choice(relu, tanh)")
    assert snapshot(f"sqlite:///{workdir / 'mlflow.db'}") == before
    no_running(workdir)


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "kill -9"])
def test_a_single_run_stops_like_a_sweep_and_a_killed_one_is_closed_by_the_next_command(workdir: Path,
                                                                                        how: str) -> None:
    proc, log = start(workdir, "trainer.epochs=50", "data.train_subset=512")
    wait_for(log, "epoch 2/", proc)
    {"SIGTERM": proc.terminate, "kill -9": proc.kill, "Ctrl-C": lambda: os.killpg(proc.pid, signal.SIGINT)}[how]()
    code = proc.wait(timeout=60)
    assert code == {"SIGTERM": 143, "Ctrl-C": 130, "kill -9": -9}[how]
    out = [line for line in log.read_text().splitlines() if "epoch" not in line and "INFO" not in line]
    if how != "kill -9":
        assert len(out) == 1 and out[0].startswith("Stopped (") and "KILLED" in out[0], out
        (run,) = job_runs(workdir)
        assert run.info.status == "KILLED"
        return
    (run,) = job_runs(workdir)
    assert run.info.status == "RUNNING"  # nothing could close it
    after = run_cli(workdir, *TINY)  # the next command in the store closes it
    assert after.returncode == 0, after.stderr[-3000:]
    closed = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and "ended without closing it" in closed.data.tags["failure_reason"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert [r for r in client.search_runs(["1"]) if r.info.status == "RUNNING"] == []


def zero_a_page(db: Path, table: str) -> int:
    """Write zeros over the root page of `table` in `db` (a used page, holding rows); returns its number."""
    with sqlite3.connect(db) as conn:
        page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    with db.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\0" * size)
    return page


@pytest.mark.parametrize(("store", "table"), [("mlflow.db", "metrics"), ("optuna.db", "trial_intermediate_values")])
def test_a_damaged_store_is_named_in_one_line_and_nothing_is_written_into_it(workdir: Path, store: str,
                                                                              table: str) -> None:
    first = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    db = workdir / store
    zero_a_page(db, table)
    damaged = hashlib.sha256(db.read_bytes()).hexdigest()
    res = run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=3")
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2, out[-3000:]
    assert out.startswith("Error: ") and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert f"{db} is damaged" in out and "nothing was written" in out
    assert hashlib.sha256(db.read_bytes()).hexdigest() == damaged
    # the advice works: save what can be read, check it, put it in place, and go on
    advice = out.split("`")[1]
    subprocess.run(advice, shell=True, check=True, cwd=workdir)
    check = subprocess.run(["sqlite3", f"{db}.recovered", "pragma quick_check"], capture_output=True, text=True)
    assert check.stdout.strip() == "ok"
    os.replace(f"{db}.recovered", db)
    assert run_cli(workdir, "-m", "workers=serial", *TINY, "hydra.sweeper.n_trials=3").returncode == 0


def test_a_time_budget_ends_the_sweep_and_a_trial_over_its_limit_fails(workdir: Path) -> None:
    res = run_cli(workdir, "-m", "workers=serial", "trainer.epochs=3", "data.train_subset=512",
                  "hydra.sweeper.n_trials=50", "+hydra.sweeper.timeout=10")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study(workdir).trials
    assert 0 < len(counted(trials)) < 50 and [t.state.name for t in trials].count("RUNNING") == 0
    assert "hydra.sweeper.timeout=10 s has passed: no trial started after it" in res.stdout + res.stderr
    begun = min(t.datetime_start for t in trials)
    assert all((t.datetime_start - begun).total_seconds() < 10 for t in trials)  # none started after the budget
    limited = run_cli(workdir, "-m", "workers=serial", "search=none", "hydra/sweeper/sampler=grid",
                      "data.train_subset=512", "trainer.epochs=choice(1,300)", "hydra.sweeper.trial_timeout=4",
                      "hydra.sweeper.study_name=limit")
    assert limited.returncode == 0, limited.stderr[-3000:]
    by_epochs = {t.params["trainer.epochs"]: t for t in optuna.load_study(
        study_name="limit", storage=f"sqlite:///{workdir / 'optuna.db'}").trials}
    assert by_epochs[1].state.name == "COMPLETE" and by_epochs[300].state.name == "FAIL"
    assert "longer than hydra.sweeper.trial_timeout=4 s" in by_epochs[300].user_attrs["fail_reason"]
    assert not by_epochs[300].user_attrs.get("interrupted")  # the trial's own fault: it counts
    no_running(workdir)
