"""The real CLI, end to end: runs and sweeps recorded in MLflow and Optuna, read back with their clients."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from conftest import run_cli
from mlflow import MlflowClient

from resnet_sweep.workers import cores

pytestmark = pytest.mark.slow
QUICK = ("trainer.epochs=2", "data.train_subset=256")


def runs(workdir: Path, experiment: str = "resnet_sweep", role: str | None = None) -> list:
    """The experiment's runs: jobs (single runs and trials) by default, or those tagged `role`."""
    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    found = [] if exp is None else client.search_runs([exp.experiment_id])
    return [r for r in found if (r.data.tags.get("role") == role if role else r.data.tags.get("role") != "sweep")]


def test_a_run_is_recorded_in_mlflow(workdir: Path) -> None:
    res = run_cli(workdir, *QUICK, "trainer.save_best=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "epoch 2/2" in res.stderr + res.stdout  # a progress line per epoch
    (run,) = runs(workdir)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.depth"] == "20" and run.data.params["model.family"] == "resnet"
    assert run.data.params["model.num_parameters"] == "269434"
    assert run.data.params["memory_format"] in ("channels_last", "contiguous")  # trainer.channels_last=null: measured
    assert run.data.tags["choice.model"] == "resnet20" and run.data.tags["choice.data"] == "digits"
    assert "data.train_subset=256" in run.data.tags["hydra.overrides"]
    assert run.data.tags["version.torch"] and run.data.tags["mlflow.source.git.commit"]
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "lr", "epoch_seconds", "samples_per_s", "test_acc"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {".hydra", "config_resolved.yaml", "best.pt"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")}
    assert ".hydra/config.yaml" in hydra_files and ".hydra/overrides.yaml" in hydra_files
    # one database, at the folder the command ran from
    assert [p.name for p in workdir.rglob("mlflow.db")] == ["mlflow.db"]


@pytest.mark.slow
def test_a_single_run_in_a_terminal_shows_a_progress_bar_within_each_epoch_and_tests_each_epoch(workdir: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()  # the run's stdout and stderr are a terminal, as in a user's shell
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # of a terminal's size
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "resnet_sweep", "trainer.epochs=2", "data.train_subset=1024",
                             "trainer.eval_test=true"], cwd=workdir, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the run ended and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(120) == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace")
    # tqdm's bar: the share done, samples so far, time spent<left, samples/s
    assert re.search(r"epoch 1/2: +\d+%\|.*\| [\d.]+k?/1.02k \[\d\d:\d\d<\d\d:\d\d, [\d.]+k?sample/s\]", text), text[-3000:]
    assert "epoch 2/2  train loss" in text  # and the epoch's line, as in a log
    # not a terminal (a log file, a sweep's worker): the epoch lines alone
    res = run_cli(workdir, *QUICK)
    assert res.returncode == 0 and not re.search(r"k?sample/s", res.stderr) and "epoch 2/2  train loss" in res.stdout
    (first,) = [r for r in runs(workdir) if r.data.params["trainer.eval_test"] == "True"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(first.info.run_id, "epoch_test_acc")
    assert sorted(m.step for m in history) == [1, 2]  # trainer.eval_test: a test per epoch, the last one the result
    (result,) = client.get_metric_history(first.info.run_id, "test_acc")
    assert (result.step, result.value) == (2, max(history, key=lambda m: m.step).value)


def test_a_compiled_run_learns_and_its_checkpoint_loads_into_a_plain_model(workdir: Path) -> None:
    import torch

    from resnet_sweep.config import ModelConfig
    from resnet_sweep.models import build_model

    res = run_cli(workdir, "trainer.compile=true", "trainer.save_best=true", "model.depth=8", "trainer.epochs=3",
                  "data.train_subset=256")
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = runs(workdir)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert run.data.params["trainer.compile"] == "True" and losses[-1] < 0.8 * losses[0]  # it learns
    path = client.download_artifacts(run.info.run_id, "best.pt", str(workdir))
    # the net's own keys, not the compiled wrapper's ("_orig_mod." before each)
    build_model(ModelConfig(depth=8), (1, 8, 8), 10).load_state_dict(torch.load(path, weights_only=True))


def test_a_single_run_trains_with_every_core_and_sweep_workers_share_them(workdir: Path) -> None:
    res = run_cli(workdir, "trainer.epochs=1", "data.train_subset=64", threads=None)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = runs(workdir)
    assert run.data.params["torch.threads"] == str(cores())
    res = run_cli(workdir, "-m", "trainer.epochs=1", "data.train_subset=64", "hydra.sweeper.n_trials=2",
                  "hydra.launcher.n_jobs=1", threads=None)
    assert res.returncode == 0, res.stderr[-3000:]
    # one joblib worker has every core to itself
    assert sorted(r.data.params["torch.threads"] for r in runs(workdir)) == [str(cores())] * 3


def test_a_two_trial_sweep_fills_optuna_and_mlflow_and_its_output_ends_on_the_summary(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *QUICK, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stderr[-3000:]
    # nothing after the summary: the workers killed at the end leave no semaphore behind (tqdm made one in
    # each, and Python's resource tracker warned "There appear to be 2 leaked semaphore objects")
    assert "] Trials: {'COMPLETE': 2, " in res.stdout.strip().splitlines()[-1], res.stdout[-2000:]
    assert "Warning" not in res.stdout + res.stderr, res.stderr[-2000:]
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    recorded = runs(workdir)
    assert len(recorded) == 2 and {r.info.status for r in recorded} == {"FINISHED"}
    # a joblib worker per core (the default), one torch thread each
    assert {r.data.params["torch.threads"] for r in recorded} == {"1"}
    values = sorted(r.data.metrics["val_acc"] for r in recorded)
    assert sorted(t.value for t in study.trials) == pytest.approx(values)
    assert list(workdir.glob("outputs/multiruns/*/*/optimization_results.yaml"))
    assert "Best trial" in res.stderr + res.stdout
    # progress: a line per finished trial, and each job's epoch lines labelled with its trial
    out = res.stderr + res.stdout
    assert re.search(r"trial [01]: COMPLETE, val_acc [0-9.]+ \| 2 of 2 trials done \(2 COMPLETE\) \| best [0-9.]+ "
                     r"\(trial [01]\) \| \d+s elapsed", out)
    assert re.search(r"trial [01]: COMPLETE, val_acc [0-9.]+ \| [12] of 2 trials done", out)
    assert "[trial 0] epoch 2/2" in out and "[trial 1] epoch 2/2" in out and "[trial 1] [trial" not in out
    # one parent run for the sweep, holding the search space and the best value
    (parent,) = runs(workdir, role="sweep")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in recorded} == {parent.info.run_id}
    assert parent.data.params["search_space.optimizer.lr"].startswith("FloatDistribution(high=0.5, log=True, low=0.01")
    assert parent.data.params["pruner"] == "NopPruner" and "TPESampler" in parent.data.params["sampler"]
    assert parent.data.metrics["best_value"] == pytest.approx(max(values))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert "optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.fresh
@pytest.mark.parametrize("override,message", [
    ("model.dpth=20", "dpth"),                      # unknown key
    ("trainer.epochs=ten", "ten"),                  # wrong type
    ("model=resnet33", "resnet20"),                 # unknown choice: lists the available ones
    ("model.depth=33", "6n+2"),                     # invalid value
])
def test_bad_overrides_fail_before_training_and_record_nothing(workdir: Path, override: str, message: str) -> None:
    res = run_cli(workdir, override)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert "epoch 1/" not in res.stderr + res.stdout
    assert runs(workdir) == []


def test_a_diverging_run_is_failed_with_its_reason(workdir: Path) -> None:
    res = run_cli(workdir, *QUICK, "optimizer.lr=1e8")
    assert res.returncode != 0
    (run,) = runs(workdir)
    assert run.info.status == "FAILED"
    # which loss overflows first (training or validation) depends on the CPU's arithmetic
    assert re.search(r"non-finite (training|validation) loss", run.data.tags["failure_reason"])
    assert "epoch 2/2" not in res.stderr + res.stdout  # it did not train on


def test_a_diverging_trial_fails_and_the_sweep_goes_on(workdir: Path) -> None:
    res = run_cli(workdir, "-m", *QUICK, "hydra.sweeper.n_trials=2", "optimizer.lr=1e8,0.05", "workers=serial")
    assert res.returncode == 0, res.stderr[-3000:]
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    states = sorted(t.state.name for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials)
    assert states == ["COMPLETE", "FAIL"]
    assert sorted(r.info.status for r in runs(workdir)) == ["FAILED", "FINISHED"]


def test_summary_prints_the_layer_table_and_params(workdir: Path) -> None:
    res = run_cli(workdir, "model=resnet56", module="resnet_sweep.summary")
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("params: 852") and "0.85M" in last
    assert "BasicBlock" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", [(), ("-m", "hydra.sweeper.n_trials=2")], ids=["single run", "2-trial sweep"])
def test_a_run_makes_no_outbound_connection(workdir: Path, command: tuple[str, ...]) -> None:
    if not shutil.which("strace"):
        if os.environ.get("CI"):
            pytest.fail("strace is not installed: .ci/run installs Debian's strace")
        pytest.skip("strace is not installed (apt-get install strace)")
    trace = workdir / "trace.txt"
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # MLflow silences its telemetry under CI itself
    res = subprocess.run(["strace", "-f", "-e", "trace=connect", "-o", str(trace), sys.executable, "-m", "resnet_sweep",
                          "trainer.epochs=1", "data.train_subset=64", *command], cwd=workdir, capture_output=True,
                         text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line]
    processes = [line for line in trace.read_text().splitlines() if "+++ exited" in line or "+++ killed" in line]
    assert len(processes) >= (3 if command else 1)  # strace -f followed a sweep's worker processes too
    outbound = [c for c in calls if ("AF_INET" in c and "127.0.0.1" not in c) or ("AF_INET6" in c and '"::1"' not in c)]
    assert outbound == [], outbound  # no DNS lookup, no telemetry
    print(f"{len(processes)} processes traced, {len(calls)} connect() calls, {len(outbound)} outbound")


@pytest.mark.slow
def test_no_password_reaches_any_record_or_log(workdir: Path) -> None:
    secret = "s3cretPW"
    url = f"data.root=postgresql://team:{secret}@db/x"  # digits ignores data.root; its value is still recorded
    single = run_cli(workdir, "trainer.epochs=1", "data.train_subset=64", url)
    swept = run_cli(workdir, "-m", "trainer.epochs=1", "data.train_subset=64", "hydra.sweeper.n_trials=2", url)
    assert single.returncode == 0 and swept.returncode == 0, single.stderr[-2000:] + swept.stderr[-2000:]
    assert secret not in single.stdout + single.stderr + swept.stdout + swept.stderr
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resnet_sweep").experiment_id])
    assert len(runs) == 4  # the single run, the study's parent and its 2 trials
    found = []
    for run in runs:
        record = f"{run.data.params} {run.data.tags}"
        found += [f"{run.info.run_id} record"] if secret in record else []
        local = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "dl" / run.info.run_id)))
        found += [str(p) for p in local.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    logs = [p for p in (workdir / "outputs").rglob("*") if p.is_file() and ".hydra" not in p.parts]
    found += [str(p) for p in logs if secret.encode() in p.read_bytes()]
    assert found == []
    assert any(secret in p.read_text() for p in (workdir / "outputs").rglob(".hydra/overrides.yaml"))  # the user's


BAD_INPUTS = {  # the command's arguments, a file to plant first (name, bytes), words the message must have
    "invalid depth": (["model.depth=33"], None, ["model.depth=33", "6n+2"]),
    "no epochs": (["trainer.epochs=0"], None, ["trainer.epochs=0", "> 0"]),
    "NaN learning rate": (["optimizer.lr=nan"], None, ["optimizer.lr=nan"]),
    "missing MNIST files": (["data=mnist", "data.download=false"], None, ["train-images-idx3-ubyte", "data=digits"]),
    "experiment name too long": ([f"tracking.experiment={'x' * 5000}"], None, ["5000 characters", "500"]),
    "MLflow file not a database": (["trainer.epochs=1"], ("mlflow.db", b"not a database " * 20),
                                   ["mlflow.db", "not an SQLite database", "tracking.uri"]),
    "Optuna file not a database": (["-m", "trainer.epochs=1"], ("optuna.db", b"not a database " * 20),
                                   ["optuna.db", "not an SQLite database", "hydra.sweeper.storage"]),
    "study name too long": (["-m", f"hydra.sweeper.study_name={'y' * 600}"], None, ["600 characters", "512"]),
    "invalid depth in a sweep": (["-m", "model.depth=33"], None, ["model.depth=33"]),
}


@pytest.mark.fresh
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_paragraph_exit_2_and_creates_no_run(workdir: Path, case: str) -> None:
    args, plant, words = BAD_INPUTS[case]
    if plant:
        (workdir / plant[0]).write_bytes(plant[1])
    res = run_cli(workdir, *args)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2, out[-3000:]
    assert out.startswith("Error: ") and len(out.splitlines()) == 1 and "Traceback" not in out, out[-3000:]
    assert all(w in out for w in words), out
    if not plant:
        assert not (workdir / "mlflow.db").exists() and not (workdir / "optuna.db").exists()


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only bind mount, holding an MLflow and an Optuna database: read-only even for
    root (chmod is not). Needs root, as CI has; skipped where mounting is refused."""
    folder = tmp_path / "ro"
    folder.mkdir()
    for name in ("mlflow.db", "optuna.db"):
        sqlite3.connect(folder / name).execute("CREATE TABLE t (x)").connection.commit()
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (not root?)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


READ_ONLY = {  # the command's arguments under the read-only folder RO, the key the message must name
    "MLflow database": (["trainer.epochs=1", "tracking.uri=sqlite:///RO/mlflow.db"], "tracking.uri"),
    "Optuna database": (["-m", "trainer.epochs=1", "hydra.sweeper.storage=sqlite:///RO/optuna.db"],
                        "hydra.sweeper.storage"),
    "run folder": (["trainer.epochs=1", "hydra.run.dir=RO/run"], "hydra.run.dir"),
    "sweep folder": (["-m", "trainer.epochs=1", "hydra.sweep.dir=RO/sweep"], "hydra.sweep.dir"),
}


@pytest.mark.fresh
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(READ_ONLY))
def test_a_read_only_store_or_output_folder_is_one_paragraph_before_anything_runs(
        workdir: Path, read_only_folder: Path, case: str) -> None:
    args, key = READ_ONLY[case]
    res = run_cli(workdir, *[a.replace("RO", str(read_only_folder)) for a in args])
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2 and out.startswith(f"Error: {key}=") and len(out.splitlines()) == 1, out[-3000:]
    assert "Read-only file system" in out
    assert not (workdir / "mlflow.db").exists() and not (workdir / "optuna.db").exists()  # no run, no study


@pytest.mark.fresh
@pytest.mark.slow
def test_a_device_this_machine_lacks_is_a_config_error(workdir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = run_cli(workdir, "trainer.device=cuda")
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2 and out.startswith("Error: trainer.device=cuda") and len(out.splitlines()) == 1
    assert "trainer.device=auto" in out and not (workdir / "mlflow.db").exists()
