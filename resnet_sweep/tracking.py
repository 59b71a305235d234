"""Records each Hydra job as one MLflow run: config as params, provenance as tags, metrics per epoch,
the job's .hydra/ folder as artifacts, and a FAILED status with the reason when a job goes wrong.

MLflow is used through `MlflowClient` with explicit run ids (no global active run), so the same code
serves the basic and the joblib launcher.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

VERSIONED = ("torch", "torchvision", "hydra-core", "hydra-optuna-sweeper", "optuna", "mlflow", "numpy",
             "omegaconf")
# MLflow keys allow alphanumerics, _ - . space / (and : on some stores); anything else becomes _.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def prepare_store(uri: str, experiment: str, artifact_location: str) -> str:
    """Create the tracking database and the experiment if missing; return the experiment id.

    Run once in the launching process (see SweepRun) so parallel jobs never race to create and
    migrate a fresh SQLite database.
    """
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    Path(artifact_location).mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(experiment, artifact_location=Path(artifact_location).resolve().as_uri())
    except MlflowException:  # another process created it between our look and our create
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


PARENT_ENV = "RESNET_SWEEP_PARENT_RUN_ID"  # how jobs, in this process or launcher workers, find the sweep's run


class SweepRun(Callback):
    """Hydra callback: one MLflow parent run per sweep, created before any job is launched.

    Creating it also creates the tracking database, once, in the sweeping process, so parallel jobs
    never race to create and migrate a fresh SQLite file. Each job's run becomes its child (through
    PARENT_ENV, inherited by launcher workers). At the end the parent gets the sweep's
    optimization results and, when the config asks for it (`report: true`), the report.
    Hydra turns a callback's exception into a warning, so jobs still create the store if it is missing.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        t = config.tracking
        if not t.enabled:
            return
        client = MlflowClient(t.uri)
        experiment_id = prepare_store(t.uri, t.experiment, t.artifact_location)
        hc = HydraConfig.get()
        sweeper = hc.sweeper
        sweep_dir = str(Path(hc.sweep.dir).resolve())
        run = client.create_run(experiment_id, run_name=f"sweep {Path(sweep_dir).parent.name}/{Path(sweep_dir).name}",
                                tags={"role": "sweep", "sweep.dir": sweep_dir,
                                      "hydra.overrides": " ".join(hc.overrides.task),
                                      "mlflow.source.git.commit": _git_commit()})
        job = JobRun(client, run.info.run_id)
        params = {f"sweeper.{k}": v for k, v in flatten(OmegaConf.to_container(sweeper, resolve=True)).items()
                  if not k.startswith("_")}
        job.log_params(params)
        os.environ[PARENT_ENV] = run.info.run_id
        log.info("MLflow sweep run %s (parent of every trial's run)", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_id = os.environ.pop(PARENT_ENV, None)
        if run_id is None:
            return
        client = MlflowClient(config.tracking.uri)
        job = JobRun(client, run_id)
        results = Path(HydraConfig.get().sweep.dir) / "optimization_results.yaml"
        if results.is_file():
            job.log_artifact(results)
            best = OmegaConf.load(results)
            if "best_value" in best:
                job.log_params({f"best.{k}": v for k, v in best.best_params.items()})
                job.log_metrics({"best_value": best.best_value}, step=0)
        if config.get("report"):
            from resnet_sweep import report  # only sweeps that ask for a report pay for matplotlib

            report.write_report(config.tracking.uri, sweep_run_id=run_id)
        client.set_terminated(run_id, "FINISHED")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.depth': 20, ...} from a nested dict/list, lists kept as one value."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


def shorten(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 14] + "...[shortened]"


def _git_commit() -> str:
    """The commit of the code that ran (this package's checkout), '-dirty' if it had local edits."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags() -> dict[str, str]:
    """Everything needed to rebuild a job besides its config: group choices, overrides, code, versions."""
    hc = HydraConfig.get()
    tags = {f"choice.{group}": str(choice) for group, choice in hc.runtime.choices.items()
            if not group.startswith("hydra/") and choice is not None}
    tags["hydra.overrides"] = " ".join(hc.overrides.task)
    tags["hydra.job_dir"] = str(hc.runtime.output_dir)
    tags["hydra.job_num"] = str(hc.job.get("num", 0))
    tags["mlflow.source.git.commit"] = _git_commit()
    tags["mlflow.source.name"] = "python -m resnet_sweep"
    tags["version.python"] = sys.version.split()[0]
    for pkg in VERSIONED:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


class JobRun:
    """One MLflow run; every write goes through log_batch so a job makes few round trips."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(clean_key(k), shorten(v, MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i: i + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(clean_key(k), shorten(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i: i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(clean_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i: i + MAX_METRICS_PER_BATCH])

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if folder.is_dir():
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, file: Path, artifact_path: str | None = None) -> None:
        if file.is_file():
            self.client.log_artifact(self.run_id, str(file), artifact_path)


@contextmanager
def job_run(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> Iterator[JobRun | None]:
    """An MLflow run for the current Hydra job, FINISHED on success, FAILED with the reason otherwise.

    Yields None when tracking is disabled. The resolved config goes in as params (long values
    shortened) and whole as config.yaml; the job's .hydra/ folder goes in as artifacts.
    """
    t = cfg.tracking
    if not t.enabled:
        yield None
        return
    client = MlflowClient(t.uri)
    experiment_id = prepare_store(t.uri, t.experiment, t.artifact_location)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tags = {**provenance_tags(), **(extra_tags or {})}
    parent = os.environ.get(PARENT_ENV)
    if parent and HydraConfig.get().mode.name == "MULTIRUN":
        tags.update({"mlflow.parentRunId": parent, "sweep.dir": str(job_dir.parent), "role": "trial"})
    run = client.create_run(experiment_id, run_name=job_dir.name if parent else None, tags=tags)
    job = JobRun(client, run.info.run_id)
    log.info("MLflow run %s in experiment '%s' at %s", run.info.run_id, t.experiment, t.uri)
    try:
        job.log_params(flatten(container))
        config_file = job_dir / "config_resolved.yaml"
        config_file.write_text(OmegaConf.to_yaml(container))
        job.log_artifact(config_file)
        yield job
    except BaseException as exc:
        job.set_tags({"failure_reason": f"{type(exc).__name__}: {exc}"})
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        job.log_artifacts(job_dir / ".hydra", ".hydra")
        client.set_terminated(job.run_id, status)
        raise
    job.log_artifacts(job_dir / ".hydra", ".hydra")
    client.set_terminated(job.run_id, "FINISHED")
