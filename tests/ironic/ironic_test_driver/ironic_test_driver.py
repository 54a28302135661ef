"""A test-only Ironic hardware type for driving a real agent on a machine Ironic cannot power.

Installed into ``.venv-ironic`` only (by ``tests/ironic/setup-ironic.sh``); never imported by
ipa-twisted. ``fake-hardware`` cannot be used because its management interface only knows
the PXE boot device, and deploying sets the DISK one; ``manual-management`` has no fake boot
(its boot interfaces all need TFTP or HTTP boot files). This type combines what the tests
need, the first of each list being the default:

- boot ``fake`` (nothing to serve: the agent is started by the test),
- deploy ``direct`` (the agent writes the image), ``fake``, ``custom-agent``, ``bootc``
  (the agent installs a bootable container image) and ``autodetect`` (one of them, chosen
  by the image),
- management ``noop`` (any boot device is fine),
- power ``fake`` (a stored power state), or ``agent`` (reboots through the agent),
- inspect ``agent`` (Ironic's built-in inspection) and ``no-inspect``,
- network ``noop``; RAID, rescue and the rest ``no-*`` or the agent's.
"""

from ironic.drivers import generic
from ironic.drivers.modules import (agent, agent_power, autodetect, fake, inspector, noop,
                                    noop_mgmt)
from ironic.drivers.modules.network import noop as noop_net
from ironic.drivers.modules.storage import noop as noop_storage


class RescueFakeBoot(fake.FakeBoot):
    """Fake boot that also "boots" the rescue ramdisk (the test starts the agent itself)."""

    def validate_rescue(self, task):
        pass


class TestHardware(generic.GenericHardware):
    """Fake boot and power, noop management, the agent for everything in-band."""

    @property
    def supported_boot_interfaces(self):
        return [fake.FakeBoot, RescueFakeBoot]

    @property
    def supported_deploy_interfaces(self):
        return [agent.AgentDeploy, agent.CustomAgentDeploy, fake.FakeDeploy,
                agent.BootcAgentDeploy, autodetect.AutodetectDeploy]

    @property
    def supported_management_interfaces(self):
        return [noop_mgmt.NoopManagement]

    @property
    def supported_power_interfaces(self):
        return [fake.FakePower, agent_power.AgentPower]

    @property
    def supported_inspect_interfaces(self):
        return [inspector.AgentInspect, noop.NoInspect]

    @property
    def supported_network_interfaces(self):
        return [noop_net.NoopNetwork]

    @property
    def supported_raid_interfaces(self):
        return [noop.NoRAID, agent.AgentRAID]

    @property
    def supported_rescue_interfaces(self):
        return [noop.NoRescue, agent.AgentRescue]

    @property
    def supported_storage_interfaces(self):
        return [noop_storage.NoopStorage]

    @property
    def supported_vendor_interfaces(self):
        return [noop.NoVendor]
