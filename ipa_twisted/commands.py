"""Command results, the command decorators, parameter validation and the busy rule."""

from __future__ import annotations

import enum
import inspect
import types
import typing
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from ipa_twisted import errors

log = Logger()

F = TypeVar("F", bound=Callable[..., Any])


class CommandStatus(str, enum.Enum):
    """The reference agent's command states, as Ironic reads them."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    VERSION_MISMATCH = "CLEAN_VERSION_MISMATCH"


@dataclass(frozen=True)
class CommandSpec:
    """How one extension method is exposed as a command."""

    name: str
    is_async: bool
    validator: Callable[..., None] | None
    attribute: str
    answer_within: float = 0.0
    """Async only: how long (s) the HTTP answer may wait for the command to end."""


def _mark(name: str | None, is_async: bool, validator: Callable[..., None] | None,
          answer_within: float = 0.0) -> Callable[[F], F]:
    def decorate(method: F) -> F:
        method._ipa_command = CommandSpec(  # type: ignore[attr-defined]
            name or method.__name__, is_async, validator, method.__name__, answer_within)
        return method
    return decorate


def sync_command(name: str | None = None,
                 validator: Callable[..., None] | None = None) -> Callable[[F], F]:
    """Expose a method as a command whose result is in the HTTP answer.

    The method may be plain or ``async def``; the answer waits for it.
    """
    return _mark(name, False, validator)


def async_command(name: str | None = None,
                  validator: Callable[..., None] | None = None,
                  answer_within: float = 0.0) -> Callable[[F], F]:
    """Expose a method as a command that runs in the background.

    The HTTP answer says RUNNING at once (unless ``?wait=true``); completion forces a
    heartbeat so Ironic learns of it quickly. With ``answer_within`` the answer waits up to
    that many seconds for the end, for a command Ironic polls right after its answer and,
    finding it RUNNING, only every ``[agent]command_wait_interval`` (6 s) after that.
    """
    return _mark(name, True, validator, answer_within)


# -- parameter validation from annotations ----------------------------------------------------

_JSON_NAMES: dict[type, str] = {dict: "an object", list: "a list", str: "a string",
                                int: "an integer", float: "a number", bool: "a boolean"}


def _accepts(annotation: Any, value: Any) -> bool:
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    base = origin or annotation
    return _JSON_NAMES.get(base, getattr(base, "__name__", str(base)))


def validate_params(method: Callable[..., Any], params: dict[str, Any]) -> None:
    """Raise InvalidCommandParamsError unless ``params`` fit ``method``'s signature and types."""
    signature = inspect.signature(method)
    try:
        hints = typing.get_type_hints(method)
    except Exception:  # unresolvable annotations: fall back to names only
        hints = {}
    accepts_extra = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    named = {name: p for name, p in signature.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(params) - set(named))
    if unknown and not accepts_extra:
        raise errors.InvalidCommandParamsError(
            f"Unknown parameter(s): {', '.join(unknown)}")
    missing = sorted(name for name, p in named.items()
                     if p.default is p.empty and name not in params)
    if missing:
        raise errors.InvalidCommandParamsError(
            f"Missing required parameter(s): {', '.join(missing)}")
    for name, value in params.items():
        if name in named and name in hints and not _accepts(hints[name], value):
            raise errors.InvalidCommandParamsError(
                f"Parameter {name} must be {_describe(hints[name])}, "
                f"not {type(value).__name__}")


# -- results ------------------------------------------------------------------------------------

class CommandResult:
    """One command's state; JSON: id, command_name, command_status, command_error, result.

    Parameters are kept for the agent's own use but never serialised: they may hold
    secrets (passwords, image tokens).
    """

    def __init__(self, command_name: str, command_params: dict[str, Any],
                 is_async: bool, answer_within: float = 0.0) -> None:
        self.id = str(uuid.uuid4())
        self.command_name = command_name
        self.command_params = command_params
        self.is_async = is_async
        self.answer_within = answer_within
        """How long the HTTP answer may wait for an async command's end (its spec's)."""
        self.command_status = CommandStatus.RUNNING
        self.command_error: errors.RESTError | None = None
        self.command_result: Any = None
        self.progress: Any = None
        """While RUNNING, an object whose ``serialize()`` shows how far the command is."""
        self._waiters: list[Deferred[CommandResult]] = []

    def is_done(self) -> bool:
        """Whether the command has left RUNNING."""
        return self.command_status is not CommandStatus.RUNNING

    def wait(self) -> Deferred[CommandResult]:
        """Fires with this result once done; cancelling it leaves the command running."""
        if self.is_done():
            return succeed(self)
        waiter: Deferred[CommandResult] = Deferred(lambda d: self._forget(d))
        self._waiters.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[CommandResult]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def succeed(self, result: Any) -> None:
        """Record success with ``result``."""
        if isinstance(result, bytes):
            result = result.decode("utf-8", "replace")
        if isinstance(result, str):
            # The reference agent's shape for text results.
            result = {"result": f"{self.command_name}: {result}"}
        elif isinstance(result, tuple):
            result = list(result)
        self.command_result = result
        self._finish(CommandStatus.SUCCEEDED)

    def fail(self, error: BaseException) -> None:
        """Record failure; non-REST errors become CommandExecutionError."""
        if isinstance(error, errors.VersionMismatch):
            self.command_error = error
            self._finish(CommandStatus.VERSION_MISMATCH)
            return
        if not isinstance(error, errors.RESTError):
            error = errors.CommandExecutionError(str(error) or type(error).__name__)
        self.command_error = error
        self._finish(CommandStatus.FAILED)

    def _finish(self, status: CommandStatus) -> None:
        self.command_status = status
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def serialize(self) -> dict[str, Any]:
        """The JSON shape Ironic reads; a running command shows its progress as its result."""
        result = self.command_result
        if self.progress is not None and self.command_status is CommandStatus.RUNNING:
            result = {"progress": self.progress.serialize()}
        return {
            "id": self.id,
            "command_name": self.command_name,
            "command_status": self.command_status.value,
            "command_error": (self.command_error.serialize()
                              if self.command_error is not None else None),
            "command_result": result,
        }


class CommandResults:
    """Results by id in submission order, bounded; running ones are never dropped."""

    def __init__(self, limit: int = 1000) -> None:
        self._results: OrderedDict[str, CommandResult] = OrderedDict()
        self._limit = limit

    def add(self, result: CommandResult) -> None:
        """Keep ``result``, dropping the oldest finished results past the limit."""
        self._results[result.id] = result
        if len(self._results) > self._limit:
            for key in [k for k, r in self._results.items() if r.is_done()][
                    :len(self._results) - self._limit]:
                del self._results[key]

    def get(self, result_id: str) -> CommandResult:
        """The result with ``result_id``; RequestedObjectNotFoundError (404) if none."""
        try:
            return self._results[result_id]
        except KeyError:
            raise errors.RequestedObjectNotFoundError("Command Result", result_id) from None

    def all(self) -> list[CommandResult]:
        """Every kept result, oldest first."""
        return list(self._results.values())

    def __len__(self) -> int:
        return len(self._results)


def split_command(full_name: Any) -> tuple[str, str]:
    """``ext.cmd`` → (ext, cmd); InvalidCommandError (400) for anything else."""
    if not isinstance(full_name, str):
        raise errors.InvalidCommandError("Command name must be a string")
    extension, dot, command = full_name.partition(".")
    if not dot or not extension or not command:
        raise errors.InvalidCommandError(
            "Command name must be of the form <extension>.<name>")
    return extension, command


async def run_command(method: Callable[..., Any], params: dict[str, Any],
                      result: CommandResult) -> CommandResult:
    """Run ``method(**params)`` (plain, Deferred or coroutine) into ``result``."""
    try:
        value = method(**params)
        if inspect.isawaitable(value):
            value = await value
    except CancelledError:
        # Something it waited on was cancelled (a time limit of its own): one line, not a
        # traceback, and a result that says so.
        log.warn("Command {command} cancelled before it finished",
                 command=result.command_name)
        result.fail(errors.CommandExecutionError("cancelled before it finished"))
    except Exception as e:
        if isinstance(e, errors.RESTError):
            log.warn("Command {command} failed: {error}", command=result.command_name,
                     error=str(e))
        else:
            log.failure("Command {command} failed", command=result.command_name)
        result.fail(e)
    else:
        log.info("Command {command} completed", command=result.command_name)
        result.succeed(value)
    return result
