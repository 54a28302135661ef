"""The Ironic contract (tests/ironic/contract.py) against FakeIronic and the real Ironic 39."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.trial.unittest import TestCase

from ipa_twisted.testing.fake_ironic import FakeIronic
from tests.ironic.contract import AGENT_VERSION, VERSION_HEADER, ironic_contract_tests
from tests.ironic.harness import RealIronic, skip_reason


async def _answer(response: Any) -> tuple[int, Any]:
    content = await response.content()
    return response.code, (await response.json() if content else None)


class _Fake:
    """FakeIronic in memory, as it is built by the agent's unit tests."""

    def __init__(self) -> None:
        self.fake = FakeIronic()
        self.http: Any = StubTreq(self.fake.app.resource())

    async def request(self, method: str, path: str, *, version: str | None = AGENT_VERSION,
                      body: bytes | None = None) -> tuple[int, Any]:
        headers = {} if version is None else {VERSION_HEADER: version}
        return await _answer(await self.http.request(method, "http://ironic.test" + path,
                                                     headers=headers, data=body))

    async def add_node(self, macs: Sequence[str], inspecting: bool = False) -> str:
        return self.fake.add_node(macs=macs).uuid


class _Real:
    """Ironic 39 (tests/ironic/harness.py), nodes enrolled where fast track lets lookup in."""

    def __init__(self, ironic: RealIronic) -> None:
        self.ironic = ironic

    async def request(self, method: str, path: str, *, version: str | None = AGENT_VERSION,
                      body: bytes | None = None) -> tuple[int, Any]:
        headers: dict[bytes | str, bytes | str] = {"Accept": "application/json",
                                                   "Content-Type": "application/json"}
        if version is not None:
            headers[VERSION_HEADER] = version
        return await _answer(await treq.request(method, self.ironic.api_url + path,
                                                headers=headers, data=body, timeout=30,
                                                persistent=False))

    async def add_node(self, macs: Sequence[str], inspecting: bool = False) -> str:
        if not inspecting:
            return await self.ironic.enroll_node(macs, state="manageable")
        uuid = await self.ironic.enroll_node(macs, state="manageable", inspect_interface="agent")
        await self.ironic.set_provision_state(uuid, "inspect")
        await self.ironic.wait_for_state(uuid, "inspect wait", timeout=60)
        return uuid


async def fake_ironic(test: TestCase) -> _Fake:
    return _Fake()


async def real_ironic(test: TestCase) -> _Real:
    reason = skip_reason()
    if reason:
        raise test.skipTest(reason)
    # Unmanaged inspection: the fake boot interface boots nothing, an agent would post.
    ironic = RealIronic(os.path.abspath(test.mktemp()), fast_track=True, require_tls=False,
                        options={"inspector": {"require_managed_boot": False}})
    await ironic.start()
    test.addCleanup(ironic.stop)
    return _Real(ironic)


class FakeIronicContractTests(ironic_contract_tests(fake_ironic)):  # type: ignore[misc]
    """FakeIronic keeps Ironic's contract."""


class RealIronicContractTests(ironic_contract_tests(real_ironic)):  # type: ignore[misc]
    """The real Ironic 39 keeps it (what makes the fake's answers worth trusting)."""

    timeout = 120
