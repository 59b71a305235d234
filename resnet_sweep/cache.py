"""The user's cache folder ($XDG_CACHE_HOME or ~/.cache, resnet_sweep/): what is costly to make and the
same every time (the digits split, the arguments of the classes a config names), made once and kept."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_sweep"


def keep(path: Path | None, write: Callable[[IO[bytes]], None], first: bool = False) -> None:
    """Write `path` whole or not at all (parallel jobs may write it at once); with `first`, only where no
    file is there yet (the first writer's stays). Where nothing can be written (no path, a read-only or
    missing home folder), nothing is kept."""
    if path is None:
        return
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


def read_json(path: Path | None) -> Any:
    """What a kept JSON file holds; None where there is none yet, it is damaged, or there is no path."""
    try:
        return json.loads(path.read_text())  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 (missing or damaged: made again by the caller)
        return None
