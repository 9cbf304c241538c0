"""The front door of every command-line tool: a user's mistake is one line, a bug is a traceback.

Errors that describe what the user gave (a missing file, a malformed record, a truncated model,
an unknown name, a config value) derive from `UserError`, and are raised where that input is read,
with a message that names the input. `main_guard` (a decorator for a CLI's `main`) and
`user_errors` (the same as a context manager) turn exactly those into

    error: <message>                 on stderr, exit status 2

and let every other exception propagate with its traceback. `ArgumentParser` reports argparse's
own mistakes (unknown option, invalid choice) the same way.

This module imports nothing heavy: the readers and the data pipeline import it too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn, TypeVar

EXIT_USER_ERROR = 2  # what argparse uses for a bad command line

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A mistake in what the user gave; the message says what and where (one line)."""


class InputError(UserError, ValueError):
    """Input that exists but cannot be used: malformed, truncated, unsupported, inconsistent."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or model name that does not exist."""


def message(error: BaseException) -> str:
    """The one-line message of an error (a KeyError's str() would add quotes)."""
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def fail(text: str) -> NoReturn:
    """Print `error: text` on stderr and exit with status 2."""
    sys.stdout.flush()
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A UserError raised inside becomes `error: ...` and exit status 2; anything else propagates."""
    try:
        yield
    except UserError as e:
        fail(message(e))


def main_guard(fn: F) -> F:
    """Decorate a CLI's main(): user errors become one line and exit status 2 (see `user_errors`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit status 2), like every other user error."""

    def error(self, text: str) -> NoReturn:
        fail(f"{text} (see {self.prog} --help)")


def yaml_problem(error: Exception) -> str:
    """Where and what a PyYAML parse error is, in one line: "line 3, column 15: expected ',' or ']' ..."."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(error, "problem", None) or error).split())


def existing_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a file; else MissingInput naming the option (`what`) it came from."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInput(f"{what} {str(path)!r}: {'is a folder, not a file' if p.is_dir() else 'no such file'}")
    return p


def enable_compilation_cache(min_compile_secs: float = 1.0) -> str | None:
    """JAX's persistent compilation cache for the command-line tools, so a second run (or a resumed
    training) reuses compiled steps: $EIJAX_COMPILATION_CACHE, default ~/.cache/eijax/jax ('' = off).
    Compilations shorter than `min_compile_secs` are not written (generate passes 0: its many small
    ones add up to seconds of a start). Returns the folder, or None when off."""
    import os

    path = os.environ.get("EIJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "eijax" / "jax"))
    if not path:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path
