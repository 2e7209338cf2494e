"""Errors a user can act on: the CLI prints them as one line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A bad argument, missing file or refused artifact; `exit_code` is the CLI's status."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
