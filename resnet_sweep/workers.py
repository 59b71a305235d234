"""A sweep's worker processes end with their sweep, a stale trial's job is stopped (SIGKILL to its
worker, `scancel` for SLURM), and SIGTERM ends a job cleanly. Standard library only: the package
imports this first (resnet_sweep/__init__.py), so a worker starts watching its sweep before the seconds
it spends importing torch.

Why our own watch: joblib's loky workers, orphaned by a `kill -9` of the sweeping process, train on to
the end and then idle for minutes holding their memory (on a GPU, its memory). Jobs of a SLURM sweep
are not watched: they outlive the process that submitted them by design.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

SWEEPER_PID_ENV = "RESNET_SWEEP_SWEEPER_PID"  # set by the sweeper for jobs in its own worker processes


class Terminated(BaseException):
    """SIGTERM (SLURM's preemption notice) as an exception, so runs and trials are closed on the way out."""


class Stalled(Terminated):
    """A job that made no progress for its stall limit, stopped by its own watchdog (trials.JobTrial)."""


_why_terminated: list[str] = []  # set before we SIGTERM ourselves, so the reason names the cause
_pending: list[BaseException] = []  # what interrupt_main raises in the main thread
_writing: list[bool] = []  # non-empty while the main thread writes its trial (see uninterrupted)
_deferred: list[int] = []  # a SIGTERM that arrived meanwhile


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A write to the study that SIGTERM or Ctrl-C must not cut in half. Why: Terminated raised between a statement
    and its commit (the handler runs as soon as SQLite's call returns) left that SQLite transaction open
    on a connection nobody closes, holding the database's write lock: the job's own clean-up, and every
    other process's writes, then waited on it (seen once in CI: a kill -9'd sweep's two workers each left
    their trial RUNNING). The signal is acted on as soon as the write is done."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    _writing.append(True)
    try:
        yield
    finally:
        _writing.pop()
    if not _writing and _deferred:
        signum = _deferred.pop()
        _deferred.clear()
        _raise_terminated(signum, None)


def interrupt_main(exc: BaseException) -> None:
    """Raise `exc` in this process's main thread, from another thread: at its next Python instruction, or
    as soon as the system call it waits in returns (a signal interrupts it). Needs install_sigterm_handler."""
    _pending[:] = [exc]
    os.kill(os.getpid(), signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    if _writing:
        _deferred.append(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if _pending:
        raise _pending.pop()
    if _why_terminated:
        raise Terminated(_why_terminated[0])
    if os.environ.get("SLURM_JOB_ID"):  # SLURM says no more; the job cannot tell which of these it was
        raise Terminated(f"SIGTERM from SLURM to job {slurm_job_id()} (preempted, cancelled, or at its time limit)")
    raise Terminated(f"terminated by signal {signum}")


def slurm_job_id() -> str:
    """The id that squeue, sacct and scancel show for this SLURM job: `12_0` for a task of array 12."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def slurm_job() -> dict[str, str]:
    """Where this job runs on a SLURM cluster, as tags for its run (empty elsewhere): job id, partition,
    node, restarts, and the log files that hydra-submitit-launcher's jobs write."""
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    facts = {"slurm.job_id": slurm_job_id(), "slurm.partition": os.environ.get("SLURM_JOB_PARTITION", ""),
             "slurm.node": os.environ.get("SLURMD_NODENAME", ""),
             "slurm.restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
             "slurm.cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK", "")}
    if os.environ.get("SUBMITIT_FOLDER"):  # a submitit job: its stdout and stderr files
        import submitit

        paths = submitit.JobEnvironment().paths
        facts.update({"slurm.stdout": str(Path(paths.stdout).resolve()), "slurm.stderr": str(Path(paths.stderr).resolve())})
    return {k: v for k, v in facts.items() if v}


def install_sigterm_handler() -> None:
    """SIGTERM raises Terminated, and Ctrl-C KeyboardInterrupt as before, each deferred while the main
    thread writes to a store (uninterrupted). SIGINT only where Python's own handler has it (a process
    started in the background ignores it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _raise_terminated)


_job_running = threading.Event()  # set while a job trains in this process
_when_orphaned: list[Callable[[str], None]] = []
_watching = threading.Lock()


@contextmanager
def job_in_progress(when_orphaned: Callable[[str], None] | None = None) -> Iterator[None]:
    """Wraps a job: should this worker's sweep die meanwhile, the job is stopped as interrupted (SIGTERM:
    it closes its run and trial) while `when_orphaned(reason)` runs (e.g. to end the dead sweep's MLflow
    parent run), and the process exits."""
    _when_orphaned[:] = [when_orphaned] if when_orphaned else []
    watch_sweeper()
    _job_running.set()
    try:
        yield
    finally:
        _job_running.clear()


def watch_sweeper() -> None:
    """In a worker process of a sweep (its parent set SWEEPER_PID_ENV): a thread that ends this process
    within a second of the sweeping process's death. Once per process; a no-op anywhere else."""
    pid = int(os.environ.get(SWEEPER_PID_ENV, "0") or 0)
    if not pid or pid == os.getpid() or not _watching.acquire(blocking=False):
        return

    if os.getppid() != pid:
        try:
            os.kill(pid, 0)
            return  # not the sweeper's own child (e.g. a job under a launcher's controller): nothing to watch
        except ProcessLookupError:
            pass  # the sweeper died before we looked: go at once

    def watch() -> None:
        while os.getppid() == pid:  # a worker's parent is the sweeper; an orphan gets init or a subreaper
            time.sleep(0.5)
        reason = f"its sweeping process (pid {pid}) died"
        threading.Timer(8, os._exit, args=(1,)).start()  # whatever the clean-up below waits on
        running = _job_running.is_set()
        if running:
            _why_terminated.append(reason)
            os.kill(os.getpid(), signal.SIGTERM)
        # first, while the job closes its own trial and run: one short write that a loaded machine could
        # otherwise see cut off by the timer above (seen in CI: the dead sweep's parent run left RUNNING)
        for callback in _when_orphaned:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 (best effort: the process is going anyway)
                pass
        deadline = time.monotonic() + 6
        while running and _job_running.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-sweeper").start()


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name, as benchmarks and the memory-format choice (memory_format.py) name a machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_label: list[str] = []  # the current job's log label, once installed; a reused worker runs job after job


def label_logs(label: str) -> None:
    """Start every log line of this job with `label` (its trial), so that the epoch lines of trials
    training side by side in parallel workers can be told apart. Done where records are made (as
    stores.mask_passwords_in_logs), since the launchers reconfigure logging handlers per job. The state
    lives here, not in __main__, which a launcher may pickle by value."""
    if _label:
        _label[0] = label
        return
    _label.append(label)
    make = logging.getLogRecordFactory()

    def labelled(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if _label[0] and isinstance(record.msg, str):
            record.msg = _label[0] + record.msg
        return record

    logging.setLogRecordFactory(labelled)


def _start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc's field 22); '' where unknown; 'Z' for a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "Z" if fields[0] == "Z" else fields[19]


def process_tags() -> dict[str, str]:
    """This process, as a run records it, so that a later command can tell that it ended (process_gone)."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            "process.start": _start_time(os.getpid())}


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process that `tags` (process_tags) name has ended: on this host only, where it can be
    seen; a pid that a new process reuses is told apart by its start time."""
    if tags.get("process.host") != socket.gethostname() or not tags.get("process.pid", "").isdigit():
        return False
    pid = int(tags["process.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _start_time(pid)
    return started == "Z" or (bool(started) and bool(tags.get("process.start")) and started != tags["process.start"])


def stop_job(job: dict[str, Any]) -> tuple[str, bool]:
    """Stop a trial's job wherever it runs ({"host", "pid", "slurm"}, trials.PROCESS): cancel its SLURM job,
    or kill this process's worker (SIGKILL: a stopped or stuck process too). Says what was done, and
    whether a worker process of this one was killed (its pool then restarts)."""
    pid = int(job.get("pid") or 0)
    if job.get("slurm"):
        subprocess.run(["scancel", str(job["slurm"])], capture_output=True, timeout=60)
        return f"its SLURM job {job['slurm']} was cancelled", False
    if job.get("host") == socket.gethostname() and kill_worker(pid):
        return f"its worker process {pid} was killed", True
    return f"its job ({job or 'not started'}) cannot be stopped from here", False


def kill_worker(pid: int) -> bool:
    """SIGKILL `pid` if it is a worker process of this one (a stopped or stuck process dies too)."""
    if pid and pid != os.getpid() and _parent_of(pid) == os.getpid():
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
