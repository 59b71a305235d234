"""Browse the records: `python -m resnet_sweep.ui` serves this folder's mlflow.db in MLflow's UI and prints
the link that opens the experiment's runs table, every run's net and result in view, best first.

Why not plain `mlflow ui`: MLflow 3's UI opens experiments on a GenAI traces page ("GenAI" mode, kept in
the browser) and shows a sweep's trials folded under their parent; a link can choose the "Model training"
mode, the runs tab, a filter and an order. This also turns MLflow's usage telemetry off for the server.
With `--uri http://HOST:PORT` (a team's tracking server) it only prints the link into that server's UI.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

from resnet_sweep.config import direction
from resnet_sweep.errors import UserError, exit_with
from resnet_sweep.stores import is_server


def runs_url(base: str, experiment_id: str, objective: str) -> str:
    """The runs table of one experiment: single runs and trials (not the sweeps' parent runs), by objective."""
    query = urllib.parse.urlencode({
        "workflowType": "machine_learning",  # MLflow's "Model training" mode, whatever the browser last used
        "searchFilter": "tags.role != 'sweep'",
        "orderByKey": f"metrics.`{objective}`",
        "orderByAsc": str(direction(objective) == "minimize").lower(),
    })
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def find_experiment(uri: str, name: str | None) -> tuple[str, str, str]:
    """(id, name, objective) of the named experiment, or of the one with the latest run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if name is not None:
        found = client.get_experiment_by_name(name)
        if found is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise UserError(f"no experiment '{name}' in {uri}; experiments there: {known}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(ids, max_results=1, order_by=["attributes.start_time DESC"]) if ids else []
    if not latest:
        raise UserError(f"no runs recorded in {uri}" + (f" (experiment '{name}')" if name else "")
                        + ": train first, e.g. python -m resnet_sweep")
    run = latest[0]
    experiment = client.get_experiment(run.info.experiment_id)
    objective = run.data.params.get("objective", "val_acc")  # several objectives: "['val_acc', ...]", sort by the first
    return experiment.experiment_id, experiment.name, re.findall(r"[\w.]+", objective)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_sweep.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=None, help="MLflow tracking URI (default: mlflow.db in this folder)")
    parser.add_argument("--experiment", default=None, help="experiment to open (default: the one with the latest run)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    uri = args.uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise UserError(f"no MLflow records here ({uri.removeprefix('sqlite:///')} does not exist): run this "
                            f"where you ran python -m resnet_sweep, or pass --uri")
        experiment_id, name, objective = find_experiment(uri, args.experiment)
    except UserError as exc:
        exit_with(exc)
    if is_server(uri):  # a tracking server already serves its UI: only the link is needed
        print(f"Open {runs_url(uri, experiment_id, objective)}\n(experiment '{name}': its runs, best {objective} first)")
        return 0
    url = runs_url(f"http://{args.host}:{args.port}", experiment_id, objective)
    print(f"Open {url}\n(experiment '{name}': its runs, best {objective} first; Ctrl-C stops the server)", flush=True)
    # MLflow 3's server also starts ~8 job-runner processes (GenAI evaluation jobs, ~1.1 GB and ~11 s of CPU
    # together) that browsing runs never uses: off, by MLflow's documented switch, unless the user set it
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # each server process warned that starlette's WSGI middleware (MLflow's) is deprecated: not the user's
           "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                    "ignore:starlette.middleware.wsgi is deprecated"]))}
    try:
        # uvicorn's log at warning: each of its 4 processes logged ~6 lines starting and ~6 stopping
        return subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                               "--port", str(args.port), "--uvicorn-opts", "--log-level warning"], env=env).returncode
    except KeyboardInterrupt:  # the server got the same Ctrl-C and stops with us
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
