"""Records each Hydra job as one MLflow run: config as params, provenance as tags, metrics per epoch,
the job's .hydra/ folder as artifacts, and a FAILED status with the reason when a job goes wrong.

MLflow is used through `MlflowClient` with explicit run ids (no global active run), so the same code
serves the basic and the joblib launcher.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig, OmegaConf

from resnet_sweep import faults
from resnet_sweep.claims import CLAIMS_TAG
from resnet_sweep.errors import described
from resnet_sweep.stores import create_whole, is_server, mask_passwords, safe_url, store_lock, wait_for_sqlite_locks
from resnet_sweep.workers import Terminated, process_gone, process_tags

log = logging.getLogger(__name__)

VERSIONED = ("torch", "torchvision", "hydra-core", "hydra-optuna-sweeper", "optuna", "mlflow", "numpy",
             "omegaconf")
# MLflow keys allow alphanumerics, _ - . space / (and : on some stores); anything else becomes _.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def prepare_store(uri: str, experiment: str, artifact_location: str) -> str:
    """Create the tracking database and the experiment if missing; return the experiment id.

    Run once in the sweeping process (see StudyRun) before any job starts, and under a lock, so
    processes never race to create and migrate a fresh database or the experiment.
    """
    with store_lock(uri, "mlflow"):  # MLflow creates and migrates a fresh database on first use: one process at a time
        create_whole(uri, lambda partial: mlflow_client(partial).search_experiments(max_results=1))
        client = mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # MLflow 3's UI opens an experiment of unknown kind on a GenAI traces page; this kind opens its runs
        tags = {EXPERIMENT_KIND: "custom_model_development"}
        if is_server(uri):  # a tracking server keeps the artifacts where it was told to (--artifacts-destination)
            return client.create_experiment(experiment, tags=tags)
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
        return client.create_experiment(experiment, artifact_location=Path(artifact_location).resolve().as_uri(),
                                        tags=tags)


def sweep_command(config: DictConfig) -> str:
    """The command that runs this sweep, as a user would type it (what the parent run records)."""
    hc = HydraConfig.get()
    return " ".join(["python -m resnet_sweep -m", *hc.overrides.task,
                     *(o for o in hc.overrides.hydra if not o.startswith("hydra.mode="))])


def _no_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def mlflow_client(uri: str) -> MlflowClient:
    """MlflowClient for `uri`; its SQLite connections wait for locks as long as Optuna's (stores). MLflow's
    SQL store logs the traceback of every database error it raises again: the error says it once."""
    logging.getLogger("mlflow.store.db.utils").addFilter(_no_traceback)
    wait_for_sqlite_locks()
    return MlflowClient(uri)


EXPERIMENT_KIND = "mlflow.experimentKind"  # the tag MLflow's UI reads (custom_model_development: model training)


class StudyRun:
    """The MLflow parent run of an Optuna study: one per study, reopened when a sweep of it is rerun.

    The sweeper has made the tracking database and experiment before (prepare_store, in the sweeping
    process, before any job starts), so parallel jobs never race to create and migrate a fresh SQLite
    file; here prepare_store only finds the experiment. It holds the search space, the
    sampler and pruner settings, and at the end the best trial and the optimization results; each job's
    run becomes its child (the sweeper hands `run_id` to each job as sweep.parent_run).
    """

    def __init__(self, config: DictConfig, study: Any, sampler: Any, pruner: Any, space: dict[str, Any],
                 history: list[tuple[str, str]] | None = None) -> None:
        t = config.tracking
        self.client = mlflow_client(t.uri) if t.enabled else None
        if self.client is None:
            return
        experiment_id = prepare_store(t.uri, t.experiment, t.artifact_location)
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            JobRun(self.client, run_id).set_tags(process_tags())  # the process that now runs the study
            if "failure_reason" in self.client.get_run(run_id).data.tags:  # of the sweep that stopped before
                self.client.delete_tag(run_id, "failure_reason")
            log.info("MLflow study run %s reopened (rerun of study '%s')", run_id, study.study_name)
        else:
            hc = HydraConfig.get()
            tags = {"role": "sweep", **process_tags(), "optuna.study": study.study_name,
                    "optuna.storage": config.hydra.sweeper.storage,
                    "mlflow.source.git.commit": _git_commit(), "hydra.overrides": " ".join(hc.overrides.task),
                    "command": sweep_command(config)}
            swept = "+".join(sorted(k.rsplit(".", 1)[-1] for k in space)) or "nothing"
            run = self.client.create_run(experiment_id, run_name=f"sweep of {swept}: study {study.study_name}",
                                         tags=record_tags(tags))
            run_id = run.info.run_id
            study.set_user_attr("mlflow_parent_run_id", run_id)
            JobRun(self.client, run_id).log_params({
                **{f"search_space.{k}": repr(v) for k, v in space.items()},
                "sampler": str(sampler.pop("_target_", "?")).rsplit(".", 1)[-1],
                **{f"sampler.{k}": v for k, v in sampler.items() if not k.startswith("_")},
                "pruner": type(pruner).__name__,
                **{f"pruner.{k}": v for k, v in vars(pruner).items() if not k.startswith("__")},
                "n_trials": config.hydra.sweeper.n_trials, "direction": str(config.hydra.sweeper.direction)})
            log.info("MLflow study run %s (parent of every trial's run)", run_id)
        self.run_id, self.experiment_id = run_id, experiment_id
        tags: dict[str, Any] = {"sweep.dir": str(Path(config.hydra.sweep.dir).resolve())}
        if config.get("claims"):  # what the report checks on this sweep's runs (claims.py), as JSON
            tags[CLAIMS_TAG] = json.dumps(OmegaConf.to_container(config.claims, resolve=True))
        if history and len(history) > 1:  # the study ran with another space or command too: each, in order
            tags["commands"] = "\n".join(command for command, _ in history)
            tags["search_spaces"] = "\n".join(space for _, space in history)
        JobRun(self.client, run_id).set_tags(tags)

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def close_orphans(self, trials: list[Any]) -> None:
        """End KILLED the trial runs that are RUNNING while their trial has ended (the job could not close its
        run: its store failed, or it was killed on a node this host cannot see)."""
        if self.client is None:
            return
        ended = {str(t.number): t for t in trials if t.state.is_finished()}
        for run in self.client.search_runs([self.experiment_id], max_results=1000,
                                           filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' "
                                                         f"and attributes.status = 'RUNNING'"):
            trial = ended.get(run.data.tags.get("optuna.trial", ""))
            if trial is not None:
                reason = str(trial.user_attrs.get("fail_reason") or f"its trial ended {trial.state.name}")
                JobRun(self.client, run.info.run_id).set_tags({"failure_reason": reason})
                self.client.set_terminated(run.info.run_id, "KILLED")

    def end_trial_runs(self, trial: int, reason: str, status: str = "KILLED") -> None:
        """End the runs of trial number `trial` that still run `status` (KILLED: interrupted), with `reason`.
        Found by their tags, not the trial's `mlflow_run_id`: a job stopped between creating its run and
        telling the trial about it leaves a run only the tags know."""
        if self.client is None:
            return
        for run in self.client.search_runs(
                [self.experiment_id], max_results=100,
                filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`optuna.trial` = '{trial}' "
                              f"and attributes.status = 'RUNNING'"):
            JobRun(self.client, run.info.run_id).set_tags({"failure_reason": reason})
            self.client.set_terminated(run.info.run_id, status)

    def finish(self, results: dict[str, Any] | None, results_file: Path | None = None,
               failed: str | None = None) -> None:
        """Record how the study stands (the results file, the best trial, the counts, or why it failed);
        `end` ends the run after."""
        if self.client is None:
            return
        job = JobRun(self.client, self.run_id)
        if results_file:
            job.log_artifact(Path(results_file))
        if results and "best_value" in results:
            # tags and metrics, not params: a rerun of the study may find a better trial
            job.set_tags({"best.trial": results["best_trial"], "best.run_id": results["best_mlflow_run_id"],
                          "best.params": results["best_params"], "best.value": results["best_value"]})
            job.log_metrics({"best_value": results["best_value"]}, step=sum(results["trials"].values()))
        if results:  # several objectives have no best value, but their counts
            job.log_metrics({f"trials_{k.lower()}": v for k, v in results["trials"].items()},
                            step=sum(results["trials"].values()))
        if failed:
            job.set_tags({"failure_reason": failed})

    def tag_pareto(self, run_ids: list[str | None]) -> None:
        """Tag pareto=true the runs of the Pareto-optimal trials (a rerun's front may differ: the others get
        pareto=false), and their ids on this run."""
        if self.client is None:
            return
        front = {r for r in run_ids if r}
        for run in self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                           max_results=5000):
            if run.info.run_id in front or run.data.tags.get("pareto") == "true":
                self.client.set_tag(run.info.run_id, "pareto", str(run.info.run_id in front).lower())
        JobRun(self.client, self.run_id).set_tags({"pareto.run_ids": " ".join(sorted(front))})

    def end(self, status: str, reason: str | None = None) -> None:
        """End the run `status` (FINISHED; KILLED: interrupted; FAILED: an error), with `reason`; a rerun of
        the study reopens it."""
        if self.client is None:
            return
        try:
            if reason:
                JobRun(self.client, self.run_id).set_tags({"failure_reason": reason})
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 (the store may be the cause; the original error matters more)
            log.warning("could not mark MLflow study run %s %s: %s", self.run_id, status, exc)


def close_dead_runs(uri: str) -> None:
    """End KILLED, with the reason, every run in the store at `uri` left RUNNING by a process of this host
    that has ended without closing it (kill -9, a crash, a store that failed under it): run by each
    command before it records anything, so that no run stays RUNNING after its process. Runs of other
    hosts' processes are theirs to close (a sweep closes its trials' runs: StudyRun.close_orphans)."""
    client = mlflow_client(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=1000) if ids else []:
        tags = run.data.tags
        if process_gone(tags):
            reason = (f"interrupted: its process (pid {tags['process.pid']} on {tags['process.host']}) ended without "
                      f"closing it (killed, or its store failed); closed by a later command")
            JobRun(client, run.info.run_id).set_tags({"failure_reason": reason})
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning("MLflow run %s was left RUNNING by a process that ended: marked KILLED", run.info.run_id)


def end_study_run(cfg: DictConfig, status: str, reason: str) -> None:
    """From a job: end its sweep's parent run (sweep.parent_run) `status`, if it still runs."""
    run_id = cfg.sweep.get("parent_run")
    if run_id and cfg.tracking.enabled:
        client = mlflow_client(cfg.tracking.uri)
        if client.get_run(run_id).info.status == "RUNNING":
            JobRun(client, run_id).set_tags({"failure_reason": reason})
            client.set_terminated(run_id, status)


def record_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow takes them: keys it accepts, values within its limit, no URL passwords."""
    return {clean_key(k): shorten(mask_passwords(str(v)), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


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


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """The commit of the code that ran (this package's checkout), '-dirty' if it had local edits. Once per
    process: the code a process runs is what it imported (a reused sweep worker: before its first job)."""
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
    tags.update(_versions())
    return tags


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Versions of the packages a run depends on, read once per process (~8 ms: they do not change under it)."""
    found = {}
    for pkg in VERSIONED:
        try:
            found[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


# Epoch metrics are written at most this often (and when the run ends). Why: a log_batch to a SQLite store
# costs ~17 ms of CPU for one epoch's ~28 metrics (ResNet-20's per-layer gradient norms included) and
# ~4 ms per epoch when 3 epochs go in one batch (MLflow updates each key's latest value once per call);
# digits' epochs last ~0.5 s, so writing each at once cost a 15-epoch trial ~0.25 s of a core its
# training needed. An epoch longer than this is still written as soon as it ends.
WRITE_EVERY_S = 2.0


class RunEnded(Terminated):
    """The job's run was ended by another process (a sweep that found its trial stale) while the job went
    on: the job stops, and the run keeps that record."""


class JobRun:
    """One MLflow run; every write goes through log_batch so a job makes few round trips."""

    def __init__(self, client: MlflowClient, run_id: str, cfg: dict[str, Any] | None = None) -> None:
        self.client, self.run_id, self.cfg = client, run_id, cfg
        # writes not waited for (log_metrics(wait=False)), made by a thread of our own: MLflow's asynchronous
        # logging (log_batch(synchronous=False)) would do the same, but then set_terminated shuts its queue
        # down, which waits up to 1 s for the queue's idle thread (measured: ~1 s per run, more than a short
        # trial's three epochs spend writing)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._unwritten: list[Metric] = []  # epochs not yet handed to the writer (see log_series)
        self._last_write = time.monotonic()
        self._write_failed: list[BaseException] = []  # a background write that failed (after MLflow's retries)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(clean_key(k), shorten(mask_passwords(str(v)), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=items)  # the client splits it into batches within MLflow's limits

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in record_tags(tags).items()]
        self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int, wait: bool = True) -> None:
        """With wait=False (an epoch's metrics), a background thread writes them while training goes on,
        at most every WRITE_EVERY_S seconds (see there); flush() writes the rest and waits."""
        self.log_series({k: {step: v} for k, v in metrics.items()}, wait)

    def log_series(self, series: dict[str, dict[int, float]], wait: bool = True) -> None:
        """Metrics over steps at once: {key: {step: value}}."""
        now = int(time.time() * 1000)
        items = [Metric(clean_key(k), float(v), now, step) for k, steps in series.items() for step, v in steps.items()]
        if wait:
            self.client.log_batch(self.run_id, metrics=items)
            return
        if self._write_failed:  # the store failed: stop here rather than train on unrecorded
            raise self._write_failed[0]
        self._unwritten += items
        if time.monotonic() - self._last_write >= WRITE_EVERY_S:
            self._hand_to_writer()

    def _hand_to_writer(self) -> None:
        items, self._unwritten = self._unwritten, []
        if not items:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="mlflow-writes")  # one: in order
        self._pending.append(self._writer.submit(self._write, items))
        self._last_write = time.monotonic()

    def _write(self, items: list[Metric]) -> None:
        if self._write_failed:  # after a failed write, the next would only wait out the same retries
            raise self._write_failed[0]
        try:
            # MLflow takes metrics for an ended run too: a job stopped for minutes (SIGSTOP) whose run a sweep
            # ended meanwhile would add the epochs it held when it wakes. One read per write (every few s). A job
            # stopped in the milliseconds between this read and the write still writes its batch on waking:
            # closing that would take a lock a stopped job could hold forever.
            if (status := self.client.get_run(self.run_id).info.status) != "RUNNING":
                raise RunEnded(f"MLflow run {self.run_id} was ended by another process ({status})")
            self.client.log_batch(self.run_id, metrics=items)
        except BaseException as exc:
            self._write_failed.append(exc)
            raise

    def flush(self) -> None:
        """Write what log_metrics(wait=False) has left, and wait for it (raises if a write failed)."""
        self._hand_to_writer()
        pending, self._pending = self._pending, []
        try:
            for write in pending:
                write.result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True, cancel_futures=True)
                self._writer = None

    def end_early(self, exc: BaseException, uri: str, job_dir: Path) -> None:
        """End the run for `exc`: FAILED for the job's own error, KILLED for an interruption (SIGTERM, Ctrl-C,
        a stall) or a fault of the environment, with the reason, the epochs so far and the .hydra/ folder.
        A run that another process has ended already (a sweep that found its trial stale) keeps its record.
        Each write is tried on its own, since the store may be the cause; none is tried against a tracking
        server that does not answer (each would wait out MLflow's retries, minutes): the next command in
        the store closes the run (close_dead_runs, StudyRun)."""
        fault = faults.classify(exc)
        if fault is not None and is_server(uri) and any(
                type(link).__module__.split(".")[0] in ("mlflow", "requests", "urllib3") for link in faults.chain(exc)):
            log.error("MLflow run %s is left RUNNING: the tracking server does not answer (%s); the next command in "
                      "that store closes it", self.run_id, fault)
            return
        try:
            if self.client.get_run(self.run_id).info.status != "RUNNING":
                log.warning("MLflow run %s was ended by another process; it keeps that record", self.run_id)
                return
        except Exception as error:  # noqa: BLE001 (the store may be the cause; the original error matters more)
            log.warning("MLflow run %s: %s: %s", self.run_id, type(error).__name__, error)
        status = "FAILED" if isinstance(exc, Exception) and fault is None else "KILLED"
        for write in (self.flush,  # the epochs recorded before it went wrong
                      lambda: self.set_tags({"failure_reason": described(exc)}),
                      lambda: self.log_text_folder(job_dir / ".hydra", ".hydra"),
                      lambda: self.client.set_terminated(self.run_id, status)):
            try:
                write()
            except Exception as error:  # noqa: BLE001 (the store may be the cause; the original error matters more)
                log.warning("MLflow run %s: %s: %s", self.run_id, type(error).__name__, error)

    def log_text_folder(self, folder: Path, artifact_path: str | None = None) -> None:
        """The files of `folder`, with any password in a URL masked (Hydra's own .hydra/ files keep what
        was typed: those on disk are the user's, the copies in MLflow are shared)."""
        if not folder.is_dir():
            return
        with tempfile.TemporaryDirectory() as tmp:
            for file in folder.rglob("*"):
                if file.is_file():
                    target = Path(tmp) / file.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(mask_passwords(file.read_text(errors="replace")))
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def log_dataset(self, name: str, n_train: int, n_val: int, n_test: int) -> None:
        """The data the run trained on, for the runs table's Dataset column (sizes tell subsets apart)."""
        sizes = f"{n_train}/{n_val}/{n_test}"
        dataset = Dataset(name=name, digest=hashlib.sha1(f"{name} {sizes}".encode()).hexdigest()[:8],
                          source_type="resnet_sweep", source=f"{name}: train/val/test {sizes}")
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as exc:
                # MLflow inserts a new dataset row after looking for it: jobs logging the same dataset at the
                # same moment collide on its key (seen on PostgreSQL); once one has, the row is found
                if attempt == 2 or not re.search(r"(?i)unique|duplicate", str(exc)):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def name_result(self, result: str) -> None:
        """The run's name with how it did (see run_name)."""
        if self.cfg is not None:
            self.client.update_run(self.run_id, name=shorten(run_name(self.cfg, result), 250))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, file: Path, artifact_path: str | None = None) -> None:
        if file.is_file():
            self.client.log_artifact(self.run_id, str(file), artifact_path)


def run_name(cfg: dict[str, Any], result: str = "") -> str:
    """What the runs table shows first, short enough for its Run Name column: the trial, how it did and
    the net, e.g. `#3 97.2% resnet20 relu BN` or `#7 loss 0.231 plain56 sigmoid noBN N(0,0.01²)`; the
    accuracy or loss is the run's objective (the metric the link of resnet_sweep.ui sorts by)."""
    m = cfg["model"]
    name = f"{m['family']}{m['depth']} {m['activation']} {'BN' if m['norm'] == 'batch' else 'noBN'}"
    if m["preactivation"]:
        name += " preact"
    if m["init"] != "kaiming":
        name += f" N(0,{m['init_std']}²)" if m["init"] == "normal" else f" {m['init']}"
    if cfg["sweep"]["seeds"] > 1:
        name += f" seed{cfg['seed']}"
    trial = cfg["sweep"]["trial"]
    return " ".join(x for x in ("" if trial is None else f"#{trial}", result, name) if x)


_job_started: list[float] = []  # when this process's current job started (see job_started)


def job_started() -> None:
    """Mark the start of a job (the task function's first line): its runs record `job_seconds` from here."""
    _job_started[:] = [time.time()]


@contextmanager
def job_run(cfg: DictConfig, extra_tags: dict[str, Any] | None = None) -> Iterator[JobRun | None]:
    """An MLflow run for the current Hydra job, FINISHED on success, FAILED with the reason otherwise.

    Yields None when tracking is disabled. The resolved config goes in as params (long values
    shortened) and whole as config.yaml; the job's .hydra/ folder goes in as artifacts.
    """
    t = cfg.tracking
    if not t.enabled:
        yield None
        return
    client = mlflow_client(t.uri)
    experiment_id = prepare_store(t.uri, t.experiment, t.artifact_location)
    if HydraConfig.get().mode.name != "MULTIRUN":  # a sweep did this before it launched its jobs
        close_dead_runs(t.uri)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tags = {**provenance_tags(), **process_tags(), "role": "run", **(extra_tags or {})}
    parent = cfg.sweep.get("parent_run")
    if parent and HydraConfig.get().mode.name == "MULTIRUN":
        tags.update({"mlflow.parentRunId": parent, "sweep.dir": str(job_dir.parent), "role": "trial"})
    job = JobRun(client, client.create_run(experiment_id, run_name=run_name(container),
                                           tags=record_tags(tags)).info.run_id, container)
    try:  # at once: a SIGTERM from here on ends the run KILLED
        log.info("MLflow run %s in experiment '%s' at %s", job.run_id, t.experiment, safe_url(t.uri))
        job.log_params(flatten({k: v for k, v in container.items() if k != "claims"}))  # the sweep's run has them
        config_file = job_dir / "config_resolved.yaml"
        config_file.write_text(mask_passwords(OmegaConf.to_yaml(container)))
        job.log_artifact(config_file)
        yield job
    except BaseException as exc:
        job.end_early(exc, t.uri, job_dir)
        raise
    job.flush()
    if _job_started:  # what the job did from its start to here, training included (bench --sweep: overhead)
        job.log_metrics({"job_seconds": time.time() - _job_started[-1]}, step=0)
    job.log_text_folder(job_dir / ".hydra", ".hydra")
    client.set_terminated(job.run_id, "FINISHED")
