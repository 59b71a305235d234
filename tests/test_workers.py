"""SIGTERM in a job: acted on at once, except in the middle of a write to the trial, which it never cuts."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, signal, time
from resnet_sweep.workers import Terminated, install_sigterm_handler, uninterrupted
install_sigterm_handler()
steps = []
try:
    with uninterrupted():  # as JobTrial's writes are
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, mid-write
        steps.append("write done")
    steps.append("after the write")
except Terminated as exc:
    print("in a write:", steps, exc)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    steps.append("not reached")
except Terminated as exc:
    print("outside:", steps, exc)
"""


def test_a_sigterm_in_the_middle_of_a_trial_write_is_raised_when_the_write_is_done() -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["in a write: ['write done'] terminated by signal 15",
                                       "outside: ['write done'] terminated by signal 15"]
