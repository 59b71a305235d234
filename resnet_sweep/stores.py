"""The databases a sweep shares (Optuna's storage, MLflow's backend): a check that each can be used, run
before anything is written, and cross-process locks for what the stores' own libraries do not make
atomic (creating Optuna's schema, a study and its MLflow parent run, a fresh MLflow database; asking a
trial, since GridSampler reads the cells in use, then claims one); whether a store answers, and URL
passwords kept out of logs. No MLflow here: the sweeper imports this module, and Hydra imports the sweeper
in every command (to list its plugins), --help and refused ones included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from resnet_sweep.errors import UserError


class StoreError(UserError):
    """A database that cannot be used as it is; the message names the file, the key and the fix."""


_waiting_for_locks: list[bool] = []
LOCK_WAIT_S = 60.0  # how long an SQLite connection waits for a lock before "database is locked"


def wait_for_sqlite_locks() -> None:
    """Make every SQLite connection this process opens through SQLAlchemy (MLflow's and Optuna's) wait up to
    LOCK_WAIT_S for a lock: sqlite3's 5 s default can pass while parallel workers and the sweeper write one
    file on a busy machine. Called where a store is opened; installs its listener once."""
    if _waiting_for_locks:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def wait(dbapi_conn: object, record: object) -> None:
        if type(dbapi_conn).__module__.startswith("sqlite3"):
            dbapi_conn.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT_S * 1000)}")  # type: ignore[attr-defined]

    event.listen(Engine, "connect", wait)
    _waiting_for_locks.append(True)


def is_database(url: str) -> bool:
    """A database URL (SQLAlchemy's: sqlite:///FILE, postgresql://...), not a journal file or a folder."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return bool(make_url(url).get_backend_name())
    except ArgumentError:
        return False


def lock_holders(url: str) -> dict[int, str]:
    """The processes (pid: command line) other than this one that hold a lock on the SQLite file of `url`
    now, from Linux's /proc/locks (SQLite locks with fcntl); {} for other stores and systems."""
    path = sqlite_file(url)
    try:
        st, table = os.stat(path), Path("/proc/locks").read_text() if path else ""
    except (OSError, TypeError):
        return {}
    held = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or not parts[4].isdigit():  # "->": waiting for it, not holding
            continue
        major, minor, inode = parts[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            held[int(parts[4])] = ""
    for pid in held:
        try:
            held[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            pass
    held.pop(os.getpid(), None)
    return held


def stuck_holders(urls: list[str], looks: int = 3, gap: float = 0.5) -> set[int]:
    """The processes that hold a lock on one of these SQLite stores at each of `looks` looks `gap` s apart:
    one that reads or writes a store for a moment (a busy worker) is not among them. A writer that waits all
    along for a stuck reader to let go can be."""
    return set(stuck_commands(urls, looks, gap))


def stuck_commands(urls: list[str], looks: int = 3, gap: float = 0.5) -> dict[int, str]:
    """stuck_holders with their command lines (pid: command), for a message that names them."""
    held = {url: lock_holders(url) for url in urls}
    for _ in range(looks - 1):
        time.sleep(gap)
        held = {url: {pid: command for pid, command in lock_holders(url).items() if pid in kept}
                for url, kept in held.items()}
    return {pid: command for kept in held.values() for pid, command in kept.items()}


def named(holders: dict[int, str]) -> str:
    """`pid 12 (python -m resnet_sweep ...), pid 34 (...)`: lock_holders as a message names them."""
    return ", ".join(f"pid {pid} ({command[:200]})" for pid, command in holders.items())


def lock_free(url: str, wait: float = 10.0) -> bool:
    """Whether a write lock on the SQLite file of `url` can be had within `wait` s (True for other stores)."""
    path = sqlite_file(url)
    if path is None:
        return True
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=wait, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        return True
    except sqlite3.Error:
        return False


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite database URL; None for other stores (and in-memory SQLite)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # not a database URL (an MLflow folder, a journal file)
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_whole(url: str, create: Callable[[str], object]) -> None:
    """Make a missing SQLite database at `url` whole or not at all: `create(url)` builds it in a temporary
    file beside it, which is then renamed into place. MLflow's schema is ~2 s of migrations: a Ctrl-C in
    the middle left a half-made mlflow.db that every later command failed on ("table span_metrics already
    exists"). Call under store_lock; a no-op for an existing file or another store (it makes its own)."""
    path = sqlite_file(url)
    if path is None or path.exists():
        return
    for left in path.parent.glob(f".{path.name}.creating-*"):  # by creations that were interrupted
        left.unlink(missing_ok=True)
    # a new name each time: MLflow keeps a store per URL, and would not make a file it once made again
    partial = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        create(f"sqlite:///{partial.resolve()}")
        os.replace(partial, path)
    except BaseException:  # a full disk, Ctrl-C: nothing half-made stays behind (its journal neither)
        for left in path.parent.glob(f"{partial.name}*"):
            left.unlink(missing_ok=True)
        raise


def check_store(url: str, key: str, busy: float | None = None) -> None:
    """Raise StoreError if the SQLite database at `url` (named by config key `key`) is not one, or cannot
    be written (locked for `busy` s, SQLite's busy timeout LOCK_WAIT_S by default); other stores are left
    to their own client. Run before any data loads or run is created."""
    busy = LOCK_WAIT_S if busy is None else busy
    path = sqlite_file(url)
    if path is None:
        return
    if not path.parent.is_dir():
        raise StoreError(f"{key}={url}: the folder {path.parent} does not exist; create it or point {key} elsewhere")
    # the folder takes a new database, its journal and our lock files; os.access also sees a read-only file
    # system, where SQLite opens an existing file read-only
    for target in ((path, path.parent) if path.exists() else (path.parent,)):
        if not os.access(target, os.W_OK):
            raise StoreError(f"{key}={url}: {target} cannot be written ({os.strerror(errno_of(target))}); make "
                             f"{path} and its folder writable, or point {key} elsewhere")
    if not path.exists():
        return
    damaged = None
    try:
        with sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=busy) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
            # every page, read only (~0.1 s for 30 MB): a damaged one would fail some later query, mid-sweep
            damaged = next((row[0] for row in conn.execute("PRAGMA quick_check(3)") if row[0] != "ok"), None)
            conn.execute("BEGIN IMMEDIATE")  # a write lock: fails on a read-only file or folder
            conn.rollback()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise StoreError(f"{key}={url}: {path} is not an SQLite database ({exc}); move it away (a new one is "
                             f"created) or point {key} at the right file") from None
        if "malformed" in str(exc):
            damaged = str(exc)
        elif "locked" in str(exc):  # held for the whole busy timeout: a stopped or stuck process holds it
            holders = stuck_commands([f"sqlite:///{path}"])
            who = named(holders) or "another process"
            pid = next(iter(holders), "PID")
            raise StoreError(f"{key}={url}: {path} has been locked for over {busy:g} s by {who}; end it (`kill {pid}`; "
                             f"a stopped process goes on after `kill -CONT {pid}`), then run the same command again") \
                from None
        else:
            raise StoreError(f"{key}={url}: {path} cannot be written ({exc}); make it and its folder writable "
                         f"(chmod u+w), or point {key} elsewhere") from None
    if damaged:
        raise StoreError(f"{key}={url}: {path} is damaged ({' '.join(damaged.split())[:200]}); nothing was written "
                         f"to it. Save what can be read with `{salvage(path)}` and move {path}.recovered to {path} "
                         f"(where `sqlite3 {path}.recovered 'pragma quick_check'` says ok), restore a backup, or move "
                         f"{path} away to start a new one")


def salvage(path: Path | str) -> str:
    """A shell command that copies what can still be read of a damaged SQLite database into PATH.recovered:
    sqlite3's .dump, made to keep what it wrote before the damaged table (it ends in ROLLBACK there).
    Not .recover: Debian's sqlite3 3.40 fails it ('SQL logic error')."""
    return f"sqlite3 {path} .dump | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 {path}.recovered"


def errno_of(path: Path) -> int:
    """Why `path` cannot be written: EROFS on a read-only file system, else EACCES."""
    try:
        return errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
    except OSError as exc:
        return exc.errno or errno.EACCES


def check_folder(folder: str | Path, key: str) -> None:
    """Raise StoreError if `folder` (named by config key `key`) cannot be made or written: its nearest
    existing ancestor must take new files."""
    target = Path(folder).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    if not os.access(target, os.W_OK):
        raise StoreError(f"{key}={folder}: {target} cannot be written ({os.strerror(errno_of(target))}); make it "
                         f"writable, or point {key} at a folder that is")


@contextmanager
def store_lock(url: str, purpose: str = "optuna") -> Iterator[None]:
    """One process at a time for `purpose` on the store at `url` (two purposes never block each other,
    even on one database). SQLite: a lock file beside the database; PostgreSQL: an advisory lock (so it
    holds across machines); other stores: none."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(url)
    except ArgumentError:  # not a database URL (an MLflow folder, a journal file)
        parsed = None
    if parsed is None:
        yield
    elif parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        with open(f"{parsed.database}.{purpose}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif parsed.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha1(f"{purpose} {url}".encode()).digest()[:8], "big", signed=True)
        engine = create_engine(parsed, poolclass=NullPool)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        yield


def is_server(uri: str) -> bool:
    """An MLflow tracking server (http, https), not a database or folder this process writes itself."""
    return uri.split(":", 1)[0].lower() in ("http", "https")


def answers(uri: str, timeout: float = 5.0) -> bool:
    """Whether the tracking store at `uri` answers now: a server's health check within `timeout` seconds
    (MLflow's own requests retry for minutes); a database or folder is taken to answer."""
    if not is_server(uri):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


_masking: list[bool] = []  # installed once per process (another factory may be installed over ours)


def mask_passwords_in_logs() -> None:
    """Mask URL passwords in every log line of this process, console and Hydra's log files alike: Hydra
    logs each job's overrides, which may carry a database URL. Done where records are made, since the
    launchers reconfigure logging (and its handlers) on every launch."""
    if _masking:
        return
    _masking.append(True)
    make = logging.getLogRecordFactory()

    def masked(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a malformed record is logging's to report, not ours)
            return record
        if "@" in message:
            record.msg, record.args = mask_passwords(message), ()
        return record

    logging.setLogRecordFactory(masked)


def safe_url(url: str) -> str:
    """One URL (a store's) with its password masked, as SQLAlchemy renders it; anything else unchanged."""
    from sqlalchemy.engine import make_url  # here: a command refused early need not import SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # a path, not a URL
        return url


def mask_passwords(text: str) -> str:
    """Free text (a log line, a config file, a param) with the password of every URL in it masked. Our own
    pattern, since SQLAlchemy renders one URL but does not find URLs in text. It also matches URLs as
    Hydra logs overrides, with `:` escaped: postgresql\\://user\\:password@host."""
    return re.sub(r"(:\\?//)([^:/@\s\\]+)(\\?:)[^@]*@", r"\1\2\3***@", text)
