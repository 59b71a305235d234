"""Time to accuracy: wall seconds from starting a training command to the end of its first epoch whose test
accuracy reaches a target, start-up included.

    python -m resnet_sweep.bench --time-to 0.99 experiment=mnist_fast data.root=../shared/data/mnist [--seeds 0,1,2]

Each seed runs the real command, `python -m resnet_sweep OVERRIDES seed=S trainer.eval_test=true`, in its own
process, recording into a temporary MLflow store made beforehand (as a user's mlflow.db already is). The
bench reads each epoch's test accuracy (epoch_test_acc) back through MlflowClient while the command trains,
and stops the command once an epoch reaches the target. The time is that metric's timestamp minus the
moment the process was started: Python's start, imports, data loading and the store count, and so does
each epoch's test pass.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

POLL_S = 2.0  # how often the store is read while the command trains (the time comes from the metric, not the poll)


@dataclass
class Reached:
    seed: int
    seconds: float | None  # None: the target was not reached
    epoch: int | None
    test_acc: float  # at that epoch, else the best of any epoch
    epochs_seen: int


def _history(client, target: float) -> tuple[list, object | None]:  # noqa: ANN001
    """(every epoch's test accuracy, epoch_test_acc, the first one at or above target) of the store's one run."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if not runs:
        return [], None
    history = sorted(client.get_metric_history(runs[0].info.run_id, "epoch_test_acc"),
                     key=lambda m: (m.step, m.timestamp))
    return history, next((m for m in history if m.value >= target), None)


def time_to(target: float, overrides: list[str], seed: int, limit_s: float, workdir: Path) -> Reached:
    """Run one seed of the command and time it to `target` test accuracy (see the module's docstring)."""
    from mlflow import MlflowClient

    from resnet_sweep.tracking import prepare_store

    uri, artifacts = f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "artifacts")
    prepare_store(uri, "time_to", artifacts)
    client = MlflowClient(uri)
    command = [sys.executable, "-m", "resnet_sweep", *overrides, f"seed={seed}", "trainer.eval_test=true",
               f"tracking.uri={uri}", f"tracking.artifact_location={artifacts}", f"hydra.run.dir={workdir / 'run'}"]
    with open(workdir / "log.txt", "w") as log:
        started = time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                ended = proc.poll() is not None  # read the store once more after the process ends
                history, hit = _history(client, target)
                if hit is not None or ended or time.time() - started > limit_s:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.terminate()  # its run ends KILLED, in this temporary store
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    print(f"seed {seed}: the command did not stop within 30 s of SIGTERM; killed "
                          f"(its log: {workdir / 'log.txt'})", file=sys.stderr)
                    proc.kill()
                    proc.wait()
    if proc.returncode not in (0, -9, -15, 143) and hit is None:  # stopped at --limit: not reached
        tail = (workdir / "log.txt").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"seed {seed}: the command failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    if hit is None:
        return Reached(seed, None, None, max((m.value for m in history), default=float("nan")), len(history))
    return Reached(seed, hit.timestamp / 1000 - started, hit.step, hit.value, len(history))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.bench --time-to", description=__doc__.split("\n")[0])
    parser.add_argument("--time-to", type=float, required=True, help="the test accuracy to reach, in [0, 1]")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="comma-separated, e.g. 0,1,2 (the default)")
    parser.add_argument("--limit", type=float, default=3600, help="seconds a seed may take before it is stopped")
    args, overrides = parser.parse_known_args(argv)
    if not 0 < args.time_to <= 1:
        parser.error(f"--time-to {args.time_to}: give a test accuracy in (0, 1], e.g. --time-to 0.99")
    from resnet_sweep.workers import cpu_name

    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="time-to-") as tmp:
            results.append(r := time_to(args.time_to, overrides, seed, args.limit, Path(tmp)))
        said = (f"{r.seconds:.1f} s to test_acc {r.test_acc:.4f} at epoch {r.epoch}" if r.seconds is not None
                else f"not reached in {r.epochs_seen} epochs (best test_acc {r.test_acc:.4f})")
        print(f"seed {seed}: {said}", file=sys.stderr, flush=True)  # progress, seed by seed
    print(f"# resnet_sweep.bench --time-to {args.time_to}, {date.today()}: {' '.join(overrides) or '(defaults)'}; "
          f"{cpu_name()}")
    print("| seed | seconds to target (start-up included) | epoch | test_acc |\n| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.seed} | {f'{r.seconds:.1f}' if r.seconds is not None else 'not reached'} | {r.epoch or '-'} "
              f"| {r.test_acc:.4f} |")
    reached = [r.seconds for r in results if r.seconds is not None]
    print(f"\nmedian {statistics.median(reached):.1f} s" if len(reached) == len(results)
          else f"\n{len(results) - len(reached)} of {len(results)} seeds did not reach {args.time_to}")
    return 0 if len(reached) == len(results) else 1
