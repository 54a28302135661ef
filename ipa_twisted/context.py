"""What the disk side is given to work with: configuration, the process runner, time.

``HardwareContext`` is handed to hardware managers (``bind``), to the deploy code and to the
block-device helpers; ``CommandRunner`` is the seam tests replace with a fake runner;
``Deployment`` is what one ``write_image`` put on a disk (the step's result).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ipa_twisted.config import AgentConfig


class CommandRunner(Protocol):
    """What the disk side uses of ``ipa_twisted.process.ProcessRunner`` (tests pass a
    FakeRunner)."""

    def execute(self, *argv: str, timeout: float | None = ...,
                check_exit_code: bool | Iterable[int] = ...) -> Deferred[tuple[bytes, bytes]]:
        ...

    def which(self, name: str) -> str | None:
        ...


@dataclass(frozen=True)
class Deployment:
    """What one ``write_image`` step put on a disk: the step's result.

    ``standby.*`` keeps the last one (``cache_image``, ``get_partition_uuids``). Ironic does
    not see it: as a deploy step's result it is written as null (``serialize``), as the
    step's result always was; it reads the partition UUIDs through
    ``standby.get_partition_uuids``.
    """

    image_id: str | None = None
    device: str | None = None
    partition_uuids: dict[str, Any] = field(default_factory=dict)

    def serialize(self) -> None:
        """Nothing: what a deploy step's result shows of it (see the class docstring)."""
        return None


@dataclass
class HardwareContext:
    """What managers are given to do their work: configuration, processes and time.

    ``config`` follows the agent's: when virtual media, mDNS or lookup change the
    configuration, the agent updates it here too.
    """

    config: AgentConfig
    runner: CommandRunner          # a ProcessRunner
    clock: IReactorTime
    reactor: Any
    http_client: Callable[..., Any] | None = None
    """Gives the agent's HTTP client (made on first use; image downloads need it):
    ``http.HTTPClients.client``, called with ``verify=False`` for the unverified twin."""
    report_progress: Callable[[Any], None] = lambda progress: None
    """Shows a long step's progress object (``serialize()``) on the running command."""
    dispatch: Callable[..., Awaitable[Any]] | None = None
    """Calls a method on the best manager that has it (``dispatch_to_managers``); set once
    the managers are loaded."""

    def http(self, *, verify: bool = True) -> Any:
        """The agent's HTTP client (treq HTTPClient); ``verify=False``: its twin that
        accepts any server certificate (``inject_files`` with ``verify_ca: false``)."""
        if self.http_client is None:
            raise RuntimeError("this HardwareContext has no HTTP client")
        return self.http_client() if verify else self.http_client(verify=False)
