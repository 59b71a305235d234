"""Real servers for the scale-out tests, each on 127.0.0.1 in a temporary folder and stopped on the way
out (also when a test fails): PostgreSQL, an MLflow tracking server with proxied artifacts, and a
single-node SLURM cluster (munge, MariaDB + slurmdbd for accounting, slurmctld, slurmd).

The SLURM set-up follows what we measured on these machines (../shared/notes/slurm-single-node.md):
accounting is needed (without it submitit cannot tell a cancelled job from a running one), requeued
jobs wait `cred_expire`, and preemption is by partition priority with a short grace time.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

PG_BINDIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
SLURM_PACKAGES = "slurm-wlm munge slurmdbd mariadb-server"
SLURM_PORTS = (6817, 6818, 6819)  # slurmctld, slurmd, slurmdbd: fixed, so one cluster test at a time


def missing(what: str, install: str) -> None:
    """Skip on a developer's machine without the package; fail under CI, which installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed: .ci/run installs Debian's {install}")
    pytest.skip(f"{what} is not installed (apt-get install {install})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout} s\n{tail}")


def _as(user: str, *cmd: str) -> list[str]:
    # PostgreSQL, munged and MariaDB refuse to run as root; CI runs as root
    return ["runuser", "-u", user, "--", *cmd] if getpass.getuser() == "root" else list(cmd)


def _daemon(stack: ExitStack, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session; stopped (SIGTERM, then SIGKILL) when `stack` closes."""
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env or os.environ.copy())

    def stop() -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass

    stack.callback(stop)
    return proc


@contextmanager
def postgres(databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[str]:
    """A PostgreSQL server with `databases`; yields its SQLAlchemy URL (no database part)."""
    if not PG_BINDIRS:
        missing("PostgreSQL", "postgresql")
    bindir = Path(PG_BINDIRS[-1])
    folder = Path(tempfile.mkdtemp(prefix="resnet_sweep_pg_"))
    folder.chmod(0o755)
    data = folder / "data"
    if getpass.getuser() == "root":
        shutil.chown(folder, "postgres")
    port = free_port()
    subprocess.run(_as("postgres", str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
                   check=True, capture_output=True)
    subprocess.run(_as("postgres", str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start",
                       "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"), check=True, capture_output=True)
    try:
        for db in databases:
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                           check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as("postgres", str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mlflow_server(backend: str, folder: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on `backend` with proxied artifacts under `folder`/artifacts, on `port` (default: a
    free one); yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder / "mlflow-server.log"
    with ExitStack() as stack:
        _daemon(stack, [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                        "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                        "--port", str(port), "--workers", "1"],
                log, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runners: ~11 CPU-s
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "mlflow server", 120, log)
        yield url


SLURM_CONF = """\
ClusterName=resnetsweep
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStoragePass={munge_socket}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=5 OverSubscribe=NO
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
"""

SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile={d}/slurmdbd.pid
LogFile={d}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageUser=root
StorageLoc=slurm_acct_db
"""


@contextmanager
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A single-node SLURM cluster (4 job slots: CPUs=4 over the machine's cores, by config_overrides;
    partitions `debug`, the default, and `urgent`, which preempts it). Yields the environment that
    clients and submitit need (SLURM_CONF); jobs inherit it."""
    if not shutil.which("slurmctld") or not shutil.which("munged") or not shutil.which("mariadbd"):
        missing("SLURM", SLURM_PACKAGES)
    if getpass.getuser() != "root":
        pytest.skip("the single-node SLURM cluster runs its daemons as root (as CI does)")
    for port in SLURM_PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is in use: another SLURM cluster runs here; stop it first")
    host = socket.gethostname()
    d = Path(tempfile.mkdtemp(prefix="resnet_sweep_slurm_"))
    d.chmod(0o755)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, d, True)
        # munge, on a socket of its own
        munge = d / "munge"
        munge.mkdir(mode=0o700)
        shutil.chown(munge, "munge", "munge")
        socket_path = munge / "munge.socket"
        _daemon(stack, _as("munge", "/usr/sbin/munged", "-F", "--force", f"--socket={socket_path}",
                           f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                           f"--seed-file={munge}/munged.seed"), d / "munged.out")
        wait_for(socket_path.exists, "munged", 30, d / "munged.out")
        # MariaDB for accounting: unix socket only, root by socket authentication
        db = d / "mysql"
        db.mkdir()
        shutil.chown(db, "mysql", "mysql")
        subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={db}/data", "--skip-test-db",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True)
        mysql_socket = db / "mysqld.sock"
        _daemon(stack, _as("mysql", "/usr/sbin/mariadbd", f"--datadir={db}/data", f"--socket={mysql_socket}",
                           "--skip-networking", f"--pid-file={db}/mysqld.pid", f"--log-error={db}/error.log"),
                d / "mariadb.out")
        wait_for(mysql_socket.exists, "mariadb", 60, db / "error.log")
        (d / "state").mkdir()
        (d / "spool").mkdir()
        conf, dbd_conf = d / "slurm.conf", d / "slurmdbd.conf"
        conf.write_text(SLURM_CONF.format(host=host, d=d, munge_socket=socket_path))
        dbd_conf.write_text(SLURMDBD_CONF.format(d=d, munge_socket=socket_path))
        dbd_conf.chmod(0o600)
        env = {**os.environ, "SLURM_CONF": str(conf), "MYSQL_UNIX_PORT": str(mysql_socket)}
        # slurmdbd reads slurmdbd.conf from the folder of slurm.conf
        _daemon(stack, ["/usr/sbin/slurmdbd", "-D"], d / "slurmdbd.out", env)
        wait_for(lambda: _listening(6819), "slurmdbd", 60, d / "slurmdbd.log")
        _daemon(stack, ["/usr/sbin/slurmctld", "-D", "-i"], d / "slurmctld.out", env)
        _daemon(stack, ["/usr/sbin/slurmd", "-D"], d / "slurmd.out", env)
        client_env = {k: v for k, v in env.items() if k != "MYSQL_UNIX_PORT"}
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=client_env, capture_output=True,
                                        text=True, timeout=10).stdout.split() == ["idle"],
                 "slurm node", 60, d / "slurmctld.log")
        yield client_env


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
