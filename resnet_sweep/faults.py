"""Faults of the environment, told apart from faults of a trial: a full disk, a store that is locked,
damaged or unreachable, no file descriptors left. Such a fault interrupts a trial (it is retried, never
counted) and stops a sweep with one paragraph that names the resource; a trial's own fault fails it.

Standard library and stores.py only: the sweeping process and the jobs both classify what they catch. The libraries
wrap the cause (Optuna's StorageInternalError around SQLAlchemy's OperationalError around sqlite3's;
MLflow's MlflowException around requests' ConnectionError), so the whole chain of causes is read, by
errno where there is one and by the messages SQLite, libpq and urllib3 give where there is not.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from resnet_sweep import stores
from resnet_sweep.errors import UserError, exit_with

EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: the environment failed; the same command, run later, goes on

# kind -> (errnos, message pattern)
_KINDS: dict[str, tuple[set[int], str]] = {
    "disk full": ({errno.ENOSPC, errno.EDQUOT}, r"database or disk is full|no space left on device|disk quota"),
    "damaged store": (set(), r"database disk image is malformed|file is not a database|database corruption"),
    "no file descriptors": ({errno.EMFILE, errno.ENFILE}, r"too many open files"),
    "store locked": (set(), r"database is locked|database table is locked"),
    "store unreachable": ({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
                           errno.ETIMEDOUT, errno.ECONNABORTED},
                          r"max retries exceeded|connection refused|could not connect to server|connection to server"
                          r"|server closed the connection|could not translate host name|name or service not known"
                          r"|temporary failure in name resolution|connection reset|connection aborted"
                          r"|failed with error code 50[234]|remote end closed connection"),
    "input/output error": ({errno.EIO}, r"disk i/o error|input/output error|unable to open database file"),
}


@dataclass(frozen=True)
class Fault:
    kind: str  # one of _KINDS
    detail: str  # the innermost message that named it
    store: str = ""  # "tracking" (MLflow's), "study" (Optuna's), or "" where the chain does not say

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})"

    @property
    def stops_sweep(self) -> bool:
        """Whether a trial that met it stops the sweep too: every fault but a store locked past SQLite's busy
        timeout, which the sweep frees (sweeper._unlock: a stuck worker that holds it is killed)."""
        return self.kind != "store locked"


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def classify(exc: BaseException) -> Fault | None:
    """The environment fault behind `exc`, or None when it is the trial's own (or unknown). A UserError
    anywhere in the chain is the user's to fix (a dataset that cannot be downloaded, say), never this."""
    links = list(chain(exc))
    if any(isinstance(link, UserError) for link in links):
        return None
    stop = next((link for link in links if isinstance(link, EnvironmentStop)), None)
    if stop is not None:
        return stop.fault
    modules = {type(link).__module__.split(".")[0] for link in links}
    store = "tracking" if modules & {"mlflow", "requests", "urllib3"} else "study" if "optuna" in modules else ""
    for kind, (errnos, pattern) in _KINDS.items():  # the innermost link that names it says most
        for link in reversed(links):
            if getattr(link, "errno", None) in errnos or re.search(pattern, str(link), re.IGNORECASE):
                return Fault(kind, " ".join(str(link).split())[:300], store)
    return None


ADVICE = {
    "disk full": "free some space there",
    "damaged store": "restore a backup, or move the file away to start a new one",
    "no file descriptors": "raise the limit (`ulimit -n`) or stop what holds them",
    "store locked": "stop the process that holds the database's lock",
    "store unreachable": "start the server, or check the network and the URL",
    "input/output error": "check the disk or the network file system",
}


def disk_report(paths: Iterable[str | Path]) -> str:
    """`/x (3 KB free): optuna.db, mlflow.db`: the free space of each file system that holds one of `paths`."""
    by_disk: dict[str, tuple[int, list[str]]] = {}
    for path in paths:
        existing = Path(path).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            free = shutil.disk_usage(existing).free
        except OSError:
            continue
        mount = _mount_point(existing)
        shown = str(Path(path).absolute().relative_to(mount)) if Path(path).is_absolute() else str(path)
        by_disk.setdefault(mount, (free, []))[1].append(shown)
    return "; ".join(f"{mount} ({_size(free)} free): {', '.join(names)}" for mount, (free, names) in by_disk.items())


def _mount_point(path: Path) -> str:
    while not path.is_mount() and path != path.parent:
        path = path.parent
    return str(path)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} TB"


class EnvironmentStop(Exception):
    """A sweep stops for a fault of the environment that one of its trials met (the trial is interrupted)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(str(fault))
        self.fault = fault


def paragraph(fault: Fault, stores: dict[str, str], then: str) -> str:
    """One paragraph for the user: what failed, where (each store by its config key, or the free space of
    the disks that hold them), the fix, and what to run once it is fixed."""
    if fault.kind == "disk full":
        where = disk_report(stores.values())
    else:
        where = ", ".join(f"{key}={value}" for key, value in stores.items())
    advice = ADVICE[fault.kind]
    return f"{fault.kind}: {where} ({fault.detail}). {advice[0].upper()}{advice[1:]}, then {then}"


def stop_sweep(exc: BaseException, storage: str, tracking: Any, sweep_dir: str, study_name: str | None,
               end_parent: Callable[[str, str], Any] | None) -> None:
    """If `exc` is a fault of the environment: end the sweep's parent run KILLED (end_parent) where its
    store answers, print one paragraph naming the resource and the fix, exit EXIT_CODE (a damaged store:
    its check's message, exit 2). Else return."""
    fault, t = classify(exc), tracking
    if fault is None:
        return
    if fault.kind == "damaged store":  # name the file, as the check before a sweep does
        try:
            stores.check_store(storage, "hydra.sweeper.storage")
            if t.enabled:
                stores.check_store(t.uri, "tracking.uri")
        except UserError as damaged:
            exit_with(damaged)
    if end_parent is not None and stores.answers(t.uri):
        end_parent("KILLED", f"interrupted: {fault}")
    where = {}
    if fault.store != "tracking":
        where["hydra.sweeper.storage"] = storage
    if t.enabled and fault.store != "study":
        where["tracking.uri"] = t.uri
    if fault.kind in ("disk full", "input/output error"):
        where = {k: str(stores.sqlite_file(v) or v) for k, v in where.items()} | {
            "hydra.sweep.dir": sweep_dir, "artifacts": str(t.artifact_location)}
    then = (f"run the same command again: study '{study_name}' goes on where it stopped (its trials in flight "
            f"were interrupted: they are run again, not counted)" if study_name else "run the same command again")
    if fault.kind == "store locked" and (holders := stores.stuck_commands(list(where.values()))):
        fault = dataclasses.replace(fault, detail=f"{fault.detail}; held by {stores.named(holders)}")  # for good
    where = {k: stores.safe_url(v) for k, v in where.items()}
    print(f"Error: sweep stopped by a fault of the environment, {paragraph(fault, where, then)}", file=sys.stderr)
    raise SystemExit(2 if fault.kind == "damaged store" else EXIT_CODE)
