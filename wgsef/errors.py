"""The project's error types and the one-line form of any exception.

Every layer of the library imports from here (nothing here imports the library), so an entry point can
catch these and print one line: the error says what is wrong and how to fix it."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; its message is one line naming the key."""


class DatasetNotFound(RuntimeError):
    """A dataset is not on disk (or not readable there) and could not be downloaded."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit this run."""


class Diverged(RuntimeError):
    """The loss or a parameter became NaN or infinite."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has no message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
