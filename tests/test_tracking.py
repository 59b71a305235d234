"""Logging edge cases never abort a job: long values, keys MLflow refuses, more metrics than one batch holds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from resnet_sweep import stores, tracking
from resnet_sweep.stores import StoreError
from resnet_sweep.tracking import JobRun, flatten, prepare_store


def test_awkward_values_keys_and_metric_counts_are_recorded(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = prepare_store(uri, "edge", str(tmp_path / "artifacts"))
    assert prepare_store(uri, "edge", str(tmp_path / "artifacts")) == experiment_id  # idempotent
    run = JobRun(client, client.create_run(experiment_id).info.run_id)
    run.log_params({"long": "x" * 7000, "a key with <bad> chars?!": 1, **{f"p{i}": i for i in range(249)},
                    "tracking.uri": "postgresql+psycopg2://team:s3cret@db/mlflow"})
    run.set_tags({"long_tag": "y" * 9000})
    run.log_metrics({f"m/{i:04d}": float(i) for i in range(1500)}, step=1)
    client.set_terminated(run.run_id)
    data = client.get_run(run.run_id).data
    assert len(data.params["long"]) <= 6000 and data.params["long"].endswith("[shortened]")
    assert data.params["a key with _bad_ chars__"] == "1"
    assert len(data.params) == 252 and len(data.metrics) == 1500 and data.metrics["m/1499"] == 1499.0
    assert data.params["tracking.uri"] == "postgresql+psycopg2://team:***@db/mlflow"  # no password in records
    assert len(data.tags["long_tag"]) <= 8000


def test_epoch_metrics_are_written_in_the_background_every_few_seconds_and_all_by_flush(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = JobRun(client, client.create_run(prepare_store(uri, "epochs", str(tmp_path / "a"))).info.run_id)
    steps = lambda: [m.step for m in client.get_metric_history(run.run_id, "val_acc")]  # noqa: E731
    for epoch in (1, 2, 3):  # quick epochs: held, to go in one batch
        run.log_metrics({"val_acc": epoch / 10, "train_loss": 1.0 / epoch}, epoch, wait=False)
    assert steps() == []
    run._last_write -= tracking.WRITE_EVERY_S  # noqa: SLF001 (as if the epoch had lasted WRITE_EVERY_S)
    run.log_metrics({"val_acc": 0.4, "train_loss": 0.25}, 4, wait=False)  # now handed to the writer
    deadline = time.monotonic() + 30
    while steps() != [1, 2, 3, 4] and time.monotonic() < deadline:  # written without a flush
        time.sleep(0.05)
    assert steps() == [1, 2, 3, 4]
    run.log_metrics({"val_acc": 0.5, "train_loss": 0.2}, 5, wait=False)
    run.flush()  # the rest, before the run ends
    assert steps() == [1, 2, 3, 4, 5]
    assert [m.value for m in client.get_metric_history(run.run_id, "train_loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_flatten_makes_dotted_keys_and_keeps_lists_whole() -> None:
    assert flatten({"model": {"depth": 20, "widths": [1, 2]}, "seed": 0}) == {
        "model.depth": 20, "model.widths": [1, 2], "seed": 0}


def test_a_database_whose_creation_is_interrupted_is_not_left_half_made(tmp_path: Path) -> None:
    """Ctrl-C during MLflow's migrations of a fresh mlflow.db once left a file every later command failed on
    ("table span_metrics already exists"): the database appears whole or not at all."""
    import pytest

    from resnet_sweep.stores import create_whole
    from resnet_sweep.tracking import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def interrupted(partial: str) -> None:
        mlflow_client(partial).search_experiments(max_results=1)  # a real schema, in the temporary file
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_whole(uri, interrupted)
    assert not (tmp_path / "mlflow.db").exists()
    experiment_id = prepare_store(uri, "after", str(tmp_path / "artifacts"))  # as the rerun does: it works
    assert MlflowClient(uri).get_experiment(experiment_id).name == "after"
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow.db" in p.name) == ["mlflow.db", "mlflow.db.mlflow.lock"]


def test_epochs_held_by_a_job_are_not_written_to_a_run_another_process_ended(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = JobRun(client, client.create_run(prepare_store(uri, "ended", str(tmp_path / "a"))).info.run_id)
    run.log_metrics({"val_acc": 0.1}, 1, wait=False)  # held, as a job stopped (SIGSTOP) mid-epoch holds it
    MlflowClient(uri).set_terminated(run.run_id, "KILLED")  # a sweep found the job silent and ended its run
    with pytest.raises(tracking.RunEnded, match="KILLED"):
        run.flush()
    assert client.get_metric_history(run.run_id, "val_acc") == []
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_the_processes_holding_an_sqlite_lock_are_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    sqlite3.connect(tmp_path / "x.db").execute("CREATE TABLE t (x)")
    holder = subprocess.Popen([sys.executable, "-c", f"import sqlite3, time; c = sqlite3.connect({str(tmp_path / 'x.db')!r}, "
                               "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        held = stores.lock_holders(url)
        assert list(held) == [holder.pid] and "BEGIN EXCLUSIVE" in held[holder.pid]
        assert not stores.lock_free(url, wait=0.2)
    finally:
        holder.kill()
        holder.wait()
    assert stores.lock_holders(url) == {} and stores.lock_free(url, wait=0.2)


def test_a_store_locked_before_a_run_is_refused_naming_the_process_that_holds_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    sqlite3.connect(tmp_path / "x.db").execute("CREATE TABLE t (x)")
    holder = subprocess.Popen([sys.executable, "-c", f"import sqlite3, time; c = sqlite3.connect("
                               f"{str(tmp_path / 'x.db')!r}, isolation_level=None); c.execute('BEGIN IMMEDIATE'); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as refused:
            stores.check_store(url, "tracking.uri", busy=0.2)
        assert f"locked for over 0.2 s by pid {holder.pid} ({sys.executable} -c import sqlite3" in str(refused.value)
        assert f"`kill {holder.pid}`" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    stores.check_store(url, "tracking.uri", busy=0.2)  # let go: accepted


def test_only_a_process_that_keeps_a_lock_across_looks_is_taken_for_stuck(tmp_path: Path) -> None:
    # a busy worker holds one store's lock for a moment, then the other's; a stopped one keeps its lock
    urls = {}
    for name in ("a", "b", "stuck"):
        sqlite3.connect(tmp_path / f"{name}.db").execute("CREATE TABLE t (x)")
        urls[name] = f"sqlite:///{tmp_path / name}.db"

    def hold(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", f"import sqlite3, time; folder = {str(tmp_path)!r}; "
                                 "lock = lambda name: sqlite3.connect(f'{folder}/{name}.db', isolation_level=None)"
                                 f".execute('BEGIN EXCLUSIVE'); {code}"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc

    stuck = hold("c = lock('stuck'); print('held', flush=True); time.sleep(60)")
    busy = hold("c = lock('a'); print('held', flush=True); time.sleep(1.5); c.connection.rollback(); "
                "d = lock('b'); time.sleep(60)")
    try:
        assert set(stores.lock_holders(urls["a"])) == {busy.pid}  # held at the first look
        assert stores.stuck_holders(list(urls.values()), looks=2, gap=3.0) == {stuck.pid}
        assert set(stores.lock_holders(urls["b"])) == {busy.pid}  # and the other store at the second
    finally:
        for proc in (stuck, busy):
            proc.kill()
            proc.wait()
