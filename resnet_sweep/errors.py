"""Errors a user can cause and fix, and how they end a command: one paragraph on stderr (what is wrong,
where, the fix), exit code 2, no traceback. HYDRA_FULL_ERROR=1 shows the traceback as well."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input: its message names the value, file or key at fault and the fix."""


def exit_with(exc: UserError) -> NoReturn:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"Error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def described(exc: BaseException) -> str:
    """`Type: message`, or just the type where the message is empty (a KeyboardInterrupt's is)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
