"""Sweep throughput, measured on real sweeps: trials per hour, sweep efficiency, per-trial overhead.

    python -m resnet_sweep.bench --sweep [--cases default short degradation] [--repeats 3] [overrides ...]

Each case runs `python -m resnet_sweep -m <its overrides> <overrides>` in a fresh temporary folder, `--repeats`
times one after another, and reads the sweep back from its MLflow records:
- trials/hour: finished trials / the command's wall seconds x 3600 (start-up and the end included);
- efficiency: the trials' training seconds (the sum of their runs' `epoch_seconds`) / (the parent run's
  wall seconds x the sweep's workers): 1.0 means every worker trained all the time. The parent run starts
  when the workers are up (a sweep starts them first); "with start-up" divides by the command's wall
  seconds instead, Hydra's and the workers' start included;
- overhead: per trial, what its job did besides training (`job_seconds` - training seconds; median). It
  starts at the task function, so it leaves out what Hydra's launcher does in the worker before (composing
  the job's config, ~0.1-0.17 s) and after; "in worker" counts everything: for each trial but a worker's
  first, the time from the end of the worker's previous run to the end of this one, less its training
  seconds (median), i.e. what a worker spends per trial besides training, the wait for the next job included.
The table shows the median of the repeats. `--startup` measures instead how long `python -m resnet_sweep`
takes from the interpreter's start to its first training step, in a fresh folder (MLflow creates its
database) and in one that has it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CASES = {
    "default": ["hydra.sweeper.n_trials=8"],
    "short": ["hydra.sweeper.n_trials=8", "trainer.epochs=3"],
    "degradation": ["experiment=degradation"],
}


def measure(overrides: list[str], workers: int) -> dict[str, float]:
    """One sweep in a fresh folder; its figures from MLflow."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "resnet_sweep", "-m", *overrides], cwd=tmp, text=True,
                             capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"the sweep failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, max_results=10000)
        parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
        trials = [r for r in runs if r.data.tags.get("role") == "trial"]
        training = {r.info.run_id: sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_seconds"))
                    for r in trials}
        overhead = [r.data.metrics["job_seconds"] - training[r.info.run_id] for r in trials
                    if "job_seconds" in r.data.metrics]
        parent_wall = (parent.info.end_time - parent.info.start_time) / 1000
        by_worker: dict[str | None, list] = {}  # which worker process ran each trial (its run's process tags)
        for r in trials:
            by_worker.setdefault(r.data.tags.get("process.pid"), []).append(r)
        in_worker = []
        for worker, runs_of in by_worker.items():
            if worker is None:  # trials whose worker is unknown: no order to read
                continue
            ordered = sorted(runs_of, key=lambda r: r.info.end_time)
            in_worker += [(b.info.end_time - a.info.end_time) / 1000 - training[b.info.run_id]
                          for a, b in zip(ordered, ordered[1:])]
        return {"trials": len(trials), "wall_s": wall, "trials_per_hour": len(trials) / wall * 3600,
                "efficiency": sum(training.values()) / (parent_wall * workers),
                "efficiency_all": sum(training.values()) / (wall * workers),
                "overhead_s": statistics.median(overhead) if overhead else float("nan"),
                "in_worker_s": statistics.median(in_worker) if in_worker else float("nan")}


def startup(folder: Path) -> float:
    """Seconds from starting `python -m resnet_sweep trainer.epochs=1` in `folder` to its first training step
    (the end of epoch 1, as MLflow timestamped it, less the epoch's training seconds)."""
    from mlflow import MlflowClient

    start = time.time()
    res = subprocess.run([sys.executable, "-m", "resnet_sweep", "trainer.epochs=1"], cwd=folder, text=True,
                         capture_output=True)
    if res.returncode != 0:
        raise SystemExit(f"the run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run, *_) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   order_by=["attributes.start_time DESC"], max_results=1)
    (epoch,) = client.get_metric_history(run.info.run_id, "epoch_seconds")
    return epoch.timestamp / 1000 - epoch.value - start


def main(argv: list[str] | None = None) -> int:
    from resnet_sweep.workers import cores, cpu_name

    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.bench --sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=cores(),
                        help="the sweep's workers, for the efficiency (default: this machine's cores, as workers=joblib)")
    parser.add_argument("--startup", action="store_true", help="measure start-up to the first training step")
    args, overrides = parser.parse_known_args(argv)
    if args.startup:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = []
            for i in range(args.repeats):
                (Path(tmp) / str(i)).mkdir()
                fresh.append(startup(Path(tmp) / str(i)))
            warm = [startup(Path(tmp) / "0") for _ in range(args.repeats)]
        print(f"# python -m resnet_sweep to its first training step, {date.today()}, {cpu_name()}: median of "
              f"{args.repeats}\nfresh folder (creates mlflow.db): {statistics.median(fresh):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in fresh)})\nfolder with mlflow.db: {statistics.median(warm):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in warm)})")
        return 0
    print(f"# resnet_sweep.bench --sweep, {date.today()}: {cpu_name()}, {cores()} cores, {args.workers} workers, "
          f"median of {args.repeats}", flush=True)
    print("| sweep | trials | wall s | trials/hour | efficiency | with start-up | overhead s/trial | in worker s/trial | runs (efficiency) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for case in args.cases:
        command = [*CASES[case], *overrides]
        got = [measure(command, args.workers) for _ in range(args.repeats)]
        med = {k: statistics.median(g[k] for g in got) for k in got[0]}
        print(f"| `-m {' '.join(command)}` | {med['trials']:.0f} | {med['wall_s']:.1f} | {med['trials_per_hour']:.0f} "
              f"| {med['efficiency']:.2f} | {med['efficiency_all']:.2f} | {med['overhead_s']:.2f} | {med['in_worker_s']:.2f} | {', '.join(format(g['efficiency'], '.2f') for g in got)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
