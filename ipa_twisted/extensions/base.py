"""The base of every extension: a named group of commands bound to the agent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from twisted.logger import Logger

from ipa_twisted import errors
from ipa_twisted.commands import CommandSpec

if TYPE_CHECKING:
    from ipa_twisted.agent import Agent


class Extension:
    """Commands of one extension (``<name>.<command>``), found by their decorators."""

    name: ClassVar[str] = ""
    commands: ClassVar[dict[str, CommandSpec]] = {}
    log = Logger()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, CommandSpec] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                spec = getattr(value, "_ipa_command", None)
                if isinstance(spec, CommandSpec):
                    found[spec.name] = spec
        cls.commands = found

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def command(self, name: str) -> tuple[CommandSpec, Any]:
        """The spec and bound method of command ``name``; InvalidCommandError if unknown."""
        spec = self.commands.get(name)
        if spec is None:
            raise errors.InvalidCommandError(f"Unknown command: {self.name}.{name}")
        return spec, getattr(self, spec.attribute)
