"""Cross-process locks for the stores that several processes create and write at once (a sweep's jobs,
two sweeps of one study): what the stores' own libraries do not make atomic is done under one of these.
Used for creating Optuna's schema, a study and its MLflow parent run, a fresh MLflow database, and for
asking a trial (GridSampler reads the cells in use, then claims one).
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from typing import Iterator


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
