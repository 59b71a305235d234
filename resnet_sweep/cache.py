"""The user's cache folder ($XDG_CACHE_HOME or ~/.cache, resnet_sweep/): what is costly to make and the
same every time (the digits split, the arguments of the classes a config names), made once and kept."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_sweep"


def keep(path: Path, write: Callable[[IO[bytes]], None], first: bool = False) -> None:
    """Write `path` whole or not at all (parallel jobs may write it at once); with `first`, only where no
    file is there yet (the first writer's stays). Where nothing can be written (a read-only or missing home
    folder), nothing is kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            if first:
                os.link(part, path)  # fails where the file is there
            else:
                os.replace(part, path)
        finally:
            Path(part).unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 (a read-only or missing home folder: nothing is kept)
        pass
