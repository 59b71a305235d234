"""Shared helpers: run the real CLI in a scratch folder, compose configs like the CLI does."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from resnet_sweep import presets

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (-n auto: one per core): one thread each for what tests train
    # in-process, else torch's default (a thread per core) in every one oversubscribes them. The
    # commands the tests start set their own (run_cli's `threads`).
    import torch

    torch.set_num_threads(1)


# tests/ on the path of a command the tests start, for its fault hooks (tests/fault_hooks.py), ahead of any
# PYTHONPATH already set (a run of a snapshot: PYTHONPATH=/tmp/snap pytest ...)
FAULT_HOOKS = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


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


# The suite's cost on 2 cores is CPU, mostly processes starting: each test's CPU seconds (its own and those
# of every process it started and waited for, as the kernel counts them), the 20 most costly printed at
# the end and the total, so a change to the suite is measured in CPU, not in wall time under load. A
# module's or session's fixture is charged to the test that set it up or tore it down.
CPU_BEGAN = pytest.StashKey[float]()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests (commands, sweeps, servers: up to a minute or so each) first, so that the quick ones
    fill the end of the run on both workers instead of one worker finishing a long sweep alone. A stable
    sort, on markers alone: every xdist worker collects the same order, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201
    item.stash[CPU_BEGAN] = _cpu_seconds()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    report = yield
    if report.when == "teardown":
        report.user_properties.append(("cpu_s", _cpu_seconds() - item.stash.get(CPU_BEGAN, _cpu_seconds())))
    return report


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    costs = {r.nodeid: dict(r.user_properties)["cpu_s"] for reports in terminalreporter.stats.values() for r in reports
             if getattr(r, "when", None) == "teardown" and "cpu_s" in dict(getattr(r, "user_properties", ()))}
    if costs:
        terminalreporter.section("CPU seconds per test (with the processes it started)")
        for nodeid, cpu in sorted(costs.items(), key=lambda kv: -kv[1])[:20]:
            terminalreporter.write_line(f"{cpu:8.1f}  {nodeid}")
        terminalreporter.write_line(f"{sum(costs.values()):8.1f}  in all, {len(costs)} tests")
        # every test's, for a closer look: .venv/bin/python -m pytest --cache-show 'resnet_sweep/*'
        if (cache := getattr(terminalreporter.config, "cache", None)) is not None:  # -p no:cacheprovider: none
            cache.set("resnet_sweep/cpu_seconds", {**cache.get("resnet_sweep/cpu_seconds", {}),
                                                   **{k: round(v, 1) for k, v in costs.items()}})


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The digits split kept in a test session's own cache folder, not the user's (data.py): every process
    the tests start inherits it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow database as MLflow makes it, once per test process: its migrations cost ~2 s of CPU
    per fresh database, and most tests are not about a fresh project."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path: Path, request: pytest.FixtureRequest, mlflow_template: Path) -> Path:
    """A scratch project folder, holding a copy of the empty MLflow database unless the test is marked
    `fresh` (about a project with no store yet)."""
    if request.node.get_closest_marker("fresh") is None:
        shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


# Sweeps as the tests start, stop and read them back: real processes, the stores read through their clients.

def study(workdir: Path) -> optuna.Study:
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def all_runs(workdir: Path, experiment: str = "resnet_sweep") -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def job_runs(workdir: Path, experiment: str = "resnet_sweep") -> list:
    return [r for r in all_runs(workdir, experiment) if r.data.tags.get("role") != "sweep"]


def parent_runs(workdir: Path, experiment: str = "resnet_sweep") -> list:
    return [r for r in all_runs(workdir, experiment) if r.data.tags.get("role") == "sweep"]


def counted(trials) -> list:  # noqa: ANN001
    """Trials that finished on their own: interrupted ones were retried and do not count."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.number not in retried
            and not t.user_attrs.get("interrupted")]


def param_sets(trials) -> list:  # noqa: ANN001
    return [tuple(sorted(t.params.items())) for t in trials]


def session_processes(proc: subprocess.Popen) -> list[int]:
    """The sweep's process and everything it started (its own session: start() uses start_new_session)."""
    out = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def wait_for_epochs(log: Path, marker: str, epochs: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the log shows `epochs` epoch lines after `marker`: mid-trial, mid-sweep."""
    wait_for(log, marker, proc, timeout)
    deadline = time.monotonic() + timeout
    while log.read_text().split(marker, 1)[-1].count("epoch ") < epochs:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {epochs} epochs after '{marker}' in {timeout} s"
        time.sleep(0.1)


def states(trials) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def start(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m resnet_sweep args` in the background, in its own session, its output in a log file."""
    log = workdir / f"sweep-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # SIGINT as a terminal's foreground job has it: a pytest started in the background (`pytest &` in a
    # script) ignores SIGINT, and a child inherits that, so the Ctrl-C test's sweep would never see it
    proc = subprocess.Popen([sys.executable, "-m", "resnet_sweep", *args], cwd=workdir, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, log


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no '{text}' in {timeout} s"
        time.sleep(0.2)
