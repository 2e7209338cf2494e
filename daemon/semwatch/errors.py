"""Exit statuses and the errors a user can act on: the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Every status a semwatch command or the daemon exits with (sysexits.h where one fits)."""

    OK = 0
    INPUT_FAILED = 1  # some inputs failed (classify, inspect), or the daemon stopped on an error
    USAGE = 2  # bad command-line arguments, a missing or refused model/folder
    DATABASE = 74  # EX_IOERR: the database was deleted or replaced under a writer, stayed
    # unwritable past [store] write_retry_seconds, or SQLite failed; nothing more was written
    LOCKED = 75  # EX_TEMPFAIL: another daemon holds this database (or one of another version)
    CONFIG = 78  # EX_CONFIG: config.toml, or a setting the machine cannot honour
    INTERRUPTED = 130  # SIGINT
    TERMINATED = 143  # SIGTERM, after a second signal


class UserError(Exception):
    """A bad argument, missing file or refused artifact; `exit_status` is the CLI's status."""

    def __init__(self, message: str, exit_status: ExitStatus = ExitStatus.USAGE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class ConfigError(UserError):
    """A configuration problem (config.toml, or a setting this machine cannot honour); the message
    names the key. Exit status 78."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.CONFIG)
