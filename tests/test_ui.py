"""The MLflow UI as a person sees it: `python -m resnet_sweep.ui` on real records, read in headless Chromium."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium")


def rendered_text(url: str) -> str:
    """The page's visible text after its JavaScript ran (Debian's chromium, headless)."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_ui_opens_on_the_runs_table_with_each_runs_net_and_result_best_first_and_ctrl_c_stops_it_quietly(
        workdir: Path) -> None:
    quick = ("trainer.epochs=2", "data.train_subset=256")
    assert run_cli(workdir, "-m", *quick, "hydra.sweeper.n_trials=3", "workers=serial").returncode == 0
    assert run_cli(workdir, *quick, "model=plain20").returncode == 0
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "resnet_sweep.ui", "--port", str(port)], cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = ui.stdout.readline().split()[-1]
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        for _ in range(120):  # the server starts in a few seconds
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        text = rendered_text(url)
    finally:
        os.killpg(ui.pid, signal.SIGINT)  # Ctrl-C in its terminal: the server's process group
        rest = ui.communicate(timeout=60)[0]
    assert ui.returncode == 0 and "Traceback" not in rest, rest
    assert not re.search(r"INFO: +(Shutting down|Finished server process|Waiting for)", rest), rest  # uvicorn's
    for _ in range(40):  # nothing left serving: its processes end within seconds
        if not subprocess.run(["pgrep", "-s", str(ui.pid)], capture_output=True).stdout:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(subprocess.run(["ps", "-o", "pid,cmd", "-s", str(ui.pid)], capture_output=True,
                                            text=True).stdout)
    # the runs table in "Model training" mode, not the GenAI overview
    assert "Run Name" in text and "Sort: val_acc" in text, text[:1500]
    assert "Detect Issues" not in text and "Traces 0" not in text
    # every run named by trial, result and net; the sweep's parent run filtered out; best first
    names = re.findall(r"((?:#\d )?\d+\.\d% (?:resnet|plain)20 relu BN)", text)
    assert len(names) == 4, text[:3000]
    assert sum(n.startswith("#") for n in names) == 3 and any(n.endswith("plain20 relu BN") for n in names)
    accuracies = [float(re.search(r"(\d+\.\d)%", n).group(1)) for n in names]
    assert accuracies == sorted(accuracies, reverse=True)
    assert "sweep of" not in text
    assert "digits" in text  # the Dataset column


@pytest.mark.fresh
def test_the_ui_without_records_says_where_to_run_it(workdir: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "resnet_sweep.ui"], cwd=workdir, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "no MLflow records here" in res.stderr and "python -m resnet_sweep" in res.stderr
    assert not list(workdir.iterdir())
