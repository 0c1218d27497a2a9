"""The one place that maps exceptions to messages and exit codes, for every command.

Exit codes: 0 success; 1 any other failure of ours; 2 bad input (usage,
configuration, key file, address, port, duration); 3 the firewall backend cannot run
here (binary or library missing); 4 the firewall refused an operation.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from spa.errors import BackendUnavailable, ConfigError, FirewallError, InvalidGrant, KeyFileError, SpaError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_BACKEND_UNAVAILABLE = 3
EXIT_FIREWALL = 4

F = TypeVar("F", bound=Callable[..., Any])


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (InvalidGrant, ConfigError, KeyFileError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, BackendUnavailable):
        return EXIT_BACKEND_UNAVAILABLE
    if isinstance(exc, FirewallError):
        return EXIT_FIREWALL
    return EXIT_FAILURE


def handle_errors(fn: F) -> F:
    """Run a click command; turn our errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpaError as exc:
            logging.getLogger("spa").debug("error detail", exc_info=True)
            click.echo(f"{click.get_current_context().command_path}: error: {exc}", err=True)
            sys.exit(exit_code_for(exc))
        except PermissionError as exc:
            click.echo(f"{click.get_current_context().command_path}: error: {exc} (run as root)", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
