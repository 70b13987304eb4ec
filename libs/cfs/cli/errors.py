"""Exit codes and the one place where failures become one-line messages."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any, NoReturn, ParamSpec, TypeVar

from typer import Exit
from typer._click import Context
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from cfs.bus.errors import BusError, BusUnavailable, is_permission_error
from cfs.fuse.config import ConfigError
from cfs.objstore.errors import ObjectStoreDenied, ObjectStoreError, ObjectStoreUnavailable
from cfs.recovery.streams import RecoveryError
from cfs.security import CredentialsError
from cfs.supervisor import SupervisorError
from cfs_contracts import ContractError

P = ParamSpec("P")
R = TypeVar("R")


class ExitCode(IntEnum):
    """Stable exit codes that scripts can rely on."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    FORBIDDEN = 4
    INTERRUPTED = 130


class CliError(Exception):
    """A failure a command reports itself: one line, a chosen exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A user's mistake or an outage is one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CliError as exc:
            _fail(f"error: {exc}", exc.code)
        except BusError as exc:
            if is_permission_error(str(exc)):
                _fail(f"error: permission denied: {exc}", ExitCode.FORBIDDEN)
            if isinstance(exc, BusUnavailable):
                _fail(f"error: {exc}", ExitCode.UNREACHABLE)
            _fail(f"error: {exc}", ExitCode.FAILED)
        except ObjectStoreError as exc:
            if isinstance(exc, ObjectStoreDenied):
                _fail(f"error: {exc}", ExitCode.FORBIDDEN)
            if isinstance(exc, ObjectStoreUnavailable):
                _fail(f"error: {exc}", ExitCode.UNREACHABLE)
            _fail(f"error: {exc}", ExitCode.FAILED)
        except (
            ConfigError,
            ContractError,
            CredentialsError,
            RecoveryError,
            SupervisorError,
        ) as exc:
            _fail(f"error: {exc}", ExitCode.FAILED)
        except KeyboardInterrupt:
            _fail("interrupted", ExitCode.INTERRUPTED)

    return wrapper


def _fail(message: str, code: ExitCode) -> NoReturn:
    print(one_line(message.split("\n", 1)[0]) if message else "error", file=sys.stderr)
    raise SystemExit(int(code))


# What str.splitlines() breaks a line at: a path or name the user typed may hold any of
# them, and the message must stay one line.
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(message: str) -> str:
    """`message` on one line: line breaks written escaped, as `repr` writes them."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in message)


class OneLineGroup(TyperGroup):
    """The root command group: a usage error (an unknown option, a value of the wrong
    type or out of range, a missing argument) is one line on stderr and exit code 2 like
    every other failure, not click's framed usage text; and a failure in a command
    group's own callback (`cfs fs` reads the client settings) is as one-line as a
    command's."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Context | None = None,
        **extra: Any,
    ) -> Context:
        with _usage_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Context) -> Any:
        with _usage_in_one_line():
            return one_line_errors(super().invoke)(ctx)


@contextlib.contextmanager
def _usage_in_one_line() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:  # `cfs admin` alone: its help, as before
        raise
    except ClickException as exc:
        ctx: Context | None = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        first = (exc.format_message().splitlines() or ["bad usage"])[0]
        print(f"error: {first}{hint}", file=sys.stderr)
        raise Exit(exc.exit_code) from None
