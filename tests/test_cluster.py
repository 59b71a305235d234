"""A team's sweep on a real cluster, end to end: `workers=slurm` sweeps on a single-node SLURM cluster,
the study in PostgreSQL, every run through an MLflow tracking server with proxied artifacts, all
started here on 127.0.0.1 (tests/services.py) and stopped at the end. Covers what happens to trials when
SLURM preempts or cancels their jobs and when the sweeping process is killed while jobs run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import services
from conftest import FAULT_HOOKS
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("cluster")]  # fixed SLURM ports: one worker
FAST_HEARTBEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4")


def slow(trials: str, seconds: float) -> tuple[str, ...]:
    """The jobs of trials `trials` (`[0,1]`) wait `seconds` before each evaluation, each epoch's validation
    (tests/fault_hooks.py): they are still training when the test stops them, at little CPU; their retries
    train at full speed."""
    return ("+hydra.callbacks.slow._target_=fault_hooks.SlowEpochs", f"+hydra.callbacks.slow.trials={trials}",
            f"+hydra.callbacks.slow.seconds={seconds}")


class Cluster:
    def __init__(self, env: dict[str, str], postgres: str, mlflow: str, folder: Path) -> None:
        self.env, self.postgres, self.mlflow, self.folder = env, postgres, mlflow, folder

    def command(self, name: str, *args: str) -> list[str]:
        """A workers=slurm sweep of study `name`, its runs in experiment `name` on the MLflow server."""
        return [sys.executable, "-m", "resnet_sweep", "-m", "workers=slurm", "hydra.launcher.cpus_per_task=1",
                f"hydra.sweeper.study_name={name}", f"hydra.sweeper.storage={self.postgres}/optuna",
                f"tracking.uri={self.mlflow}", f"tracking.experiment={name}", "report=false", *FAST_HEARTBEAT, *args]

    def start(self, workdir: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = workdir / f"sweep-{time.monotonic_ns()}.log"
        proc = subprocess.Popen(self.command(name, *args), cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env={**self.env, "PYTHONUNBUFFERED": "1", **FAULT_HOOKS}, start_new_session=True)
        return proc, log

    def sweep(self, workdir: Path, name: str, *args: str) -> str:
        proc, log = self.start(workdir, name, *args)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        return log.read_text()

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=f"{self.postgres}/optuna")

    def runs(self, name: str) -> list:
        client = MlflowClient(self.mlflow)
        return client.search_runs([client.get_experiment_by_name(name).experiment_id])

    def slurm(self, *cmd: str) -> str:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=True, timeout=30).stdout

    def accounting(self, job_ids: set[str], timeout: float = 180) -> dict[str, str]:
        """sacct's final state of each job in `job_ids` (accounting lags behind the jobs: over 60 s was seen on
        a loaded CI machine)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.slurm("sacct", "-n", "-X", "-P", "-o", "JobID,State").split()
            states = {job: state.split()[0] for job, state in (line.split("|") for line in lines) if job in job_ids}
            if set(states) == job_ids and all(s not in ("RUNNING", "PENDING") for s in states.values()):
                return states
            assert time.monotonic() < deadline, f"sacct shows {states} for jobs {job_ids}"
            time.sleep(1)


@pytest.fixture(scope="session")  # once per test process: its SLURM ports are fixed
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    with services.postgres() as pg, services.slurm_cluster() as env, \
            services.mlflow_server(f"{pg}/mlflow", folder / "mlflow") as url:
        yield Cluster(env, pg, url, folder)


def counted(trials: list) -> list:
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.number not in retried
            and not t.user_attrs.get("interrupted")]


def slurm_id(trial: optuna.trial.FrozenTrial) -> str:
    return str(trial.user_attrs["job"]).removeprefix("SLURM job ")


def wait_for_jobs(cluster: Cluster, name: str, n: int, proc: subprocess.Popen, log: Path, timeout: float = 300,
                  attr: str = "mlflow_run_id") -> list:
    """Until `n` trials of study `name` are trained by started SLURM jobs that have set user attr `attr`
    (mlflow_run_id: the job is training, its run recorded); returns those trials."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            started = [t for t in cluster.study(name).trials if t.state.name == "RUNNING" and attr in t.user_attrs]
        except Exception:  # noqa: BLE001 (the study, or the schema, is not created yet)
            started = []
        if len(started) >= n:
            return started
        assert time.monotonic() < deadline, f"{n} jobs of {name} did not start in {timeout} s\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def assert_finished_cleanly(cluster: Cluster, name: str, n_trials: int) -> list:
    trials = cluster.study(name).trials
    assert "RUNNING" not in {t.state.name for t in trials}
    done = counted(trials)
    assert len(done) == n_trials and {t.state.name for t in done} == {"COMPLETE"}, [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in done}) == n_trials  # no parameter set trained twice
    runs = cluster.runs(name)
    assert "RUNNING" not in {r.info.status for r in runs}
    assert len([r for r in runs if r.data.tags.get("role") == "sweep"]) == 1
    return trials


def test_a_slurm_sweep_runs_each_trial_as_a_job_and_records_it_through_the_mlflow_server(cluster: Cluster,
                                                                                          tmp_path: Path) -> None:
    started = time.monotonic()
    cluster.sweep(tmp_path, "slurm4", "trainer.epochs=1", "data.train_subset=128", "hydra.sweeper.n_trials=4")
    seconds = time.monotonic() - started
    trials = assert_finished_cleanly(cluster, "slurm4", 4)
    jobs = {slurm_id(t) for t in trials}
    states = cluster.accounting(jobs)
    print(f"4 trials as SLURM jobs in {seconds:.1f} s; sacct: {states}")
    assert len(jobs) == 4 and set(states.values()) == {"COMPLETED"}

    runs = cluster.runs("slurm4")
    (parent,) = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["slurm.job_id"] for r in children} == jobs
    for run in children:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
        assert run.data.tags["slurm.partition"] == "debug" and run.data.params["torch.threads"] == "1"
        assert Path(run.data.tags["slurm.stdout"]).is_file()
        config = Path(download_artifacts(run_id=run.info.run_id, artifact_path="config_resolved.yaml",
                                         tracking_uri=cluster.mlflow, dst_path=str(tmp_path / run.info.run_id)))
        assert f"trial: {run.data.tags['optuna.trial']}" in config.read_text()
    stored = list((cluster.folder / "mlflow" / "artifacts").rglob("config_resolved.yaml"))
    assert len(stored) >= 4  # the files landed in the server's artifact store

    # the report reads the same records through the server
    res = subprocess.run([sys.executable, "-m", "resnet_sweep.report", "--uri", cluster.mlflow, "--experiment",
                          "slurm4", "--out", str(tmp_path / "reports")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (summary,) = (tmp_path / "reports").rglob("summary.md")
    assert "4 run(s) on digits" in summary.read_text() and "| resnet | 20 | 4/4 |" in summary.read_text()
    files = [f.path for f in MlflowClient(cluster.mlflow).list_artifacts(parent.info.run_id, "report")]
    assert "report/summary.md" in files  # uploaded to the sweep's run through the server
    ui = subprocess.run([sys.executable, "-m", "resnet_sweep.ui", "--uri", cluster.mlflow, "--experiment", "slurm4"],
                        capture_output=True, text=True, timeout=120)
    assert ui.returncode == 0 and f"Open {cluster.mlflow}/#/experiments/{parent.info.experiment_id}/runs?" in ui.stdout


def test_a_preempted_trial_ends_its_run_killed_and_is_retried(cluster: Cluster, tmp_path: Path) -> None:
    proc, log = cluster.start(tmp_path, "preempt", "trainer.epochs=20", "data.train_subset=256",
                              "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.launcher.cpus_per_task=2",
                              *slow("[0,1]", 1))
    running = wait_for_jobs(cluster, "preempt", 2, proc, log)
    time.sleep(3)  # mid-training
    # a job in the higher-priority partition that needs 2 of the node's 4 CPUs: SLURM preempts a trial
    urgent = cluster.slurm("sbatch", "--parsable", "-p", "urgent", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 5")
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    trials = assert_finished_cleanly(cluster, "preempt", 2)
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1, [(t.number, t.state.name, t.user_attrs) for t in trials]
    (victim,) = interrupted
    assert victim.number in {t.number for t in running}
    assert "SIGTERM from SLURM" in victim.user_attrs["fail_reason"]
    retry = [t for t in trials if victim.number in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == victim.params
    progress = log.read_text()  # the sweep's line per trial says which was interrupted and which completed
    assert f"trial {victim.number}: interrupted (to run again)" in progress
    assert f"trial {retry[0].number}: COMPLETE" in progress
    runs = {r.info.run_id: r for r in cluster.runs("preempt")}
    killed = runs[victim.user_attrs["mlflow_run_id"]]
    assert killed.info.status == "KILLED" and "SIGTERM from SLURM" in killed.data.tags["failure_reason"]
    states = cluster.accounting({slurm_id(victim), urgent.strip()})
    print(f"preempted trial {victim.number} (job {slurm_id(victim)}): sacct {states}")
    # SLURM stopped it (the job, handling SIGTERM, exits non-zero within the grace time: FAILED)
    assert states[slurm_id(victim)] in ("PREEMPTED", "CANCELLED", "FAILED")


def test_killing_the_sweeping_process_leaves_its_jobs_training_and_a_rerun_adopts_them(cluster: Cluster,
                                                                                       tmp_path: Path) -> None:
    # trials 0 and 1 take 20 epochs of over a second: they still train after the wait below; 2 and 3 are quick
    args = ("trainer.epochs=20", "data.train_subset=256", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
            *slow("[0,1]", 1))
    proc, log = cluster.start(tmp_path, "adopt", *args)
    first = wait_for_jobs(cluster, "adopt", 2, proc, log, attr="job")  # started, whatever they are doing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(6)  # longer than grace_period: had the jobs' trials no heartbeat of their own, they would go stale
    states = {t.number: t.state.name for t in cluster.study("adopt").trials if t.number in {f.number for f in first}}
    assert set(states.values()) <= {"RUNNING", "COMPLETE"}, states  # alive (or done on their own), never stale
    assert "RUNNING" in states.values(), states  # so the rerun below has a job to adopt
    text = cluster.sweep(tmp_path, "adopt", *args)
    for t in first:  # the rerun launched no job for them (the sweeper logs each trial it starts)
        assert f"] trial {t.number} started: " not in text
    trials = assert_finished_cleanly(cluster, "adopt", 4)
    by_number = {t.number: t for t in trials}
    for t in first:  # trained once, by their own jobs, never marked dead
        assert by_number[t.number].state.name == "COMPLETE" and not by_number[t.number].user_attrs.get("interrupted")
    assert not any(t.system_attrs.get("retry_history") for t in trials)
    assert len(trials) == 4


def test_cancelled_and_silently_killed_jobs_have_their_trials_retried_and_the_sweep_goes_on(cluster: Cluster,
                                                                                            tmp_path: Path) -> None:
    proc, log = cluster.start(tmp_path, "scancel", "trainer.epochs=20", "data.train_subset=256",
                              "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *slow("[0,1]", 1))
    cancelled, killed = wait_for_jobs(cluster, "scancel", 2, proc, log)
    time.sleep(2)
    cluster.slurm("scancel", slurm_id(cancelled))  # SIGTERM: the job says why it stops
    cluster.slurm("scancel", "--signal=KILL", slurm_id(killed))  # SIGKILL: it dies without a word
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    trials = assert_finished_cleanly(cluster, "scancel", 2)
    by_number = {t.number: t for t in trials}
    for victim in (cancelled, killed):
        assert by_number[victim.number].state.name == "FAIL"  # interrupted: not counted, its retry is
        assert any(victim.number in t.system_attrs.get("retry_history", []) and t.state.name == "COMPLETE"
                   for t in trials)
    assert "SIGTERM from SLURM" in by_number[cancelled.number].user_attrs["fail_reason"]
    retry = next(t for t in trials if killed.number in t.system_attrs.get("retry_history", []))
    print(f"trial {killed.number}, its job SIGKILLed, retried as trial {retry.number}: {retry.user_attrs['retry_reason']}")


def test_two_sweep_processes_of_one_study_through_the_mlflow_server(cluster: Cluster, tmp_path: Path) -> None:
    procs = [cluster.start(tmp_path, "two", "trainer.epochs=1", "data.train_subset=128", "hydra.sweeper.n_trials=4",
                           "hydra.sweeper.n_jobs=2") for _ in range(2)]
    for proc, log in procs:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    trials = assert_finished_cleanly(cluster, "two", 4)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(params) - len(set(params)) == 0  # duplicate parameter sets: none
    children = [r for r in cluster.runs("two") if r.data.tags.get("role") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in trials)
