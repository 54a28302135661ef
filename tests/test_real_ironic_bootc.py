"""A real Ironic 39 deploys a bootable container image through our agent (``bootc`` deploy
interface), onto a loop device.

What Ironic's ``bootc`` deploy interface does (``ironic.drivers.modules.agent.
BootcAgentDeploy``): ``validate`` wants ``instance_info['image_source']`` to be an
``oci://`` URL; its own deploy step ``execute_bootc_install`` (priority 80, shadowing the
agent's step of that name, priority 0) calls the agent's in-band ``deploy.
execute_bootc_install`` with the args ``image_source`` (as given), ``configdrive`` (the
node's config drive, or None) and ``oci_pull_secret``: the password part of
``instance_info['image_pull_secret']`` (else ``driver_info``'s, else ``[deploy]
image_server_*``, else ``[oci]authentication_config``), base64-encoded once more. Ironic
itself never asks the registry anything in this interface (only ``autodetect`` does, to
tell a bootc image from a disk image: ``RealIronicAutodetectTests``), so a plain HTTP
registry on 127.0.0.1 is the agent's podman's business alone: here the sandboxed agent sees a private /etc/containers
(as a ramdisk would carry) whose registries.conf marks the test's registry insecure.

The registry wants a password; the node's ``image_pull_secret`` is the registry token
(base64 of ``user:password``, as in a podman or docker auth file), which Ironic passes on.
The image's ``bootc`` is the stand-in of ``tests/test_bootc.py`` (bootc is not packaged in
Debian): it records its arguments and writes a GPT. The rest is real: Ironic, the agent in
the disk sandbox, podman pulling and running the image privileged with the sandbox's /dev,
the partition check and the config drive partition.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

DISK = 1024 * 1024 * 1024
USER, PASSWORD = "ipa", "s3cret"
AUTHORIZED_KEYS = "ssh-ed25519 AAAAC3 op@ipa\n"


class BootcDeployBed(TestCase):
    """A real Ironic, a registry holding the bootc test image and a loop disk for the
    sandboxed agent (no tests of its own)."""

    timeout = 600
    registry_password: str | None = PASSWORD
    """The registry's password for ``USER``; None: the registry wants none."""
    push_index = False
    """Push the image as an image index (one image manifest, for this machine's platform),
    as bootc images are published; else as an image manifest alone."""
    ironic_options: dict[str, dict[str, object]] = {
        "DEFAULT": {"enabled_deploy_interfaces": "direct,custom-agent,bootc"}}

    async def setUp(self) -> None:  # type: ignore[override]
        from ipa_twisted.process import ProcessRunner
        from ipa_twisted.testing.sandbox import attach_loop_devices
        from tests.ironic.harness import skip_reason, start_ironic
        from tests.podman import PodmanBed
        from tests.test_bootc import FAKE_BOOTC, stand_in_layout
        reason = skip_reason(macs=True, loop_devices=True,
                             tools=("parted", "sgdisk", "mkfs.vfat", "blockdev"))
        if reason:
            raise SkipTest(reason)
        if not os.path.isdir("/etc/containers"):
            raise SkipTest("no /etc/containers to give the sandboxed agent a private one")
        self.bed = bed = await PodmanBed.start(self)
        # podman's default storage directory, which the reference's podman run mounts.
        os.makedirs("/var/lib/containers", mode=0o700, exist_ok=True)
        self.runner = ProcessRunner(reactor, reactor)
        [self.loop] = await attach_loop_devices(self.runner, os.path.join(bed.dir, "disks"),
                                                [DISK], self.addCleanup)
        await stand_in_layout(self.runner, self.bed.dir, DISK)
        await bed.build_image("localhost/ipa-test/bootc:1", {"/usr/bin/bootc": FAKE_BOOTC.format(
            dir=bed.dir, tail_mib=DISK // (1024 * 1024) - 1)}, ["/usr/bin/bootc"])
        password = self.registry_password
        host = await bed.start_registry(self, user=USER if password else None,
                                        password=password)
        self.image_source = f"oci://{host}/ipa-test/bootc:1"
        if self.push_index:
            await self.push_index_of("localhost/ipa-test/bootc:1", f"{host}/ipa-test/bootc:1")
        else:
            await bed.push("localhost/ipa-test/bootc:1", f"{host}/ipa-test/bootc:1",
                           creds=f"{USER}:{password}" if password else None)
        self.etc = self.private_etc_containers()
        self.dir = os.path.abspath(self.mktemp())
        self.ironic = await start_ironic(
            self, self.dir, restrict_lookup=True, heartbeat_timeout=10,
            options=self.ironic_options)

    async def push_index_of(self, local: str, remote: str) -> None:
        """Push ``local`` to ``remote`` as an OCI image index holding it, then drop every
        local image."""
        run = self.bed.runner.execute
        await run("podman", "manifest", "create", "localhost/ipa-test/index:1", timeout=120)
        await run("podman", "manifest", "add", "localhost/ipa-test/index:1",
                  f"containers-storage:{local}", timeout=120)
        await run("podman", "manifest", "push", "--all", "--format", "oci",
                  "--tls-verify=false", "localhost/ipa-test/index:1", f"docker://{remote}",
                  timeout=120)
        await run("podman", "rmi", "-a", "-f", timeout=120)

    def private_etc_containers(self) -> str:
        """The /etc/containers the agent sees: this machine's, with the test bed's storage
        and registries (the test's registry insecure: plain HTTP) and host networking, so
        that no container network is made on this machine."""
        etc = os.path.join(self.bed.dir, "etc-containers")
        shutil.copytree("/etc/containers", etc, symlinks=True)
        shutil.rmtree(os.path.join(etc, "containers.conf.d"), ignore_errors=True)
        for name in ("storage.conf", "registries.conf"):
            shutil.copyfile(os.path.join(self.bed.dir, name), os.path.join(etc, name))
        with open(os.path.join(self.bed.dir, "containers.conf")) as f:
            conf = f.read().replace("[containers]\n", '[containers]\nnetns = "host"\n', 1)
        with open(os.path.join(etc, "containers.conf"), "w") as f:
            f.write(conf)
        return etc

    def start_agent(self) -> Any:
        """The agent in the disk sandbox, with ``self.etc`` bind-mounted on /etc/containers
        inside the sandbox's private mount namespace (gone with it)."""
        from tests.ironic.harness import start_agent
        from tests.processes import in_sandbox
        sandbox = in_sandbox([self.loop])

        def wrap(argv: list[str]) -> list[str]:
            return sandbox(["sh", "-c", 'mount --bind "$0" /etc/containers && exec "$@"',
                            self.etc, *argv])
        return start_agent(self, self.ironic, self.dir, wrap=wrap,
                           config="include_loop_devices = true\n")

    async def deploy(self, pull_secret: str | None, target: str,
                     configdrive: str | None = None,
                     deploy_interface: str = "bootc") -> tuple[dict[str, Any], str]:
        """Enroll a node with ``deploy_interface``, deploy the test's image with
        ``pull_secret`` as its ``image_pull_secret`` (None: none), start the agent once
        Ironic waits for it; the node once in ``target`` and the agent's output."""
        from tests.processes import physical_macs
        uuid = await self.ironic.enroll_node(
            physical_macs(), deploy_interface=deploy_interface,
            properties={"root_device": {"name": self.loop.path}, "local_gb": 1,
                        "cpu_arch": "x86_64"})
        started = reactor.seconds()
        instance_info = {"image_source": self.image_source,
                         "bootc_authorized_keys": AUTHORIZED_KEYS}
        if pull_secret is not None:
            instance_info["image_pull_secret"] = pull_secret
        await self.ironic.deploy(uuid, instance_info, configdrive=configdrive)
        await self.ironic.wait_for_state(uuid, "wait call-back", timeout=120)
        agent = self.start_agent()
        node = await self.ironic.wait_for_state(uuid, target, timeout=420)
        print(f"\n  {deploy_interface}: deploy request to {target} in "
              f"{reactor.seconds() - started:.1f}s")
        return node, agent.output.decode(errors="replace")

    def stand_in_argv(self) -> list[str] | None:
        """The arguments the image's bootc was run with, None if it never ran."""
        try:
            with open(os.path.join(self.bed.dir, "bootc-argv")) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return None

    async def disk_layout(self) -> Any:
        from ipa_twisted.blockdev import disks
        from ipa_twisted.config import AgentConfig
        from ipa_twisted.context import HardwareContext
        context = HardwareContext(AgentConfig(include_loop_devices=True), self.runner,
                                  reactor, reactor)
        return await disks.read_layout(context, self.loop.path)

    def assert_stand_in_ran(self, log: str) -> None:
        """The image's bootc ran onto the loop device as the reference agent runs it."""
        self.assertIn(f"Container image ({self.image_source}) written to device "
                      f"{self.loop.path}", log)
        argv = self.stand_in_argv()
        assert argv is not None, log[-3000:]
        self.assertEqual(argv[:5], ["install", "to-disk", "--wipe", "--skip-fetch-check",
                                    f"--root-size={DISK // 2 ** 20 - 768}M"])
        self.assertTrue(argv[5].startswith("--root-ssh-authorized-keys=/tmp/"), argv)
        self.assertEqual(argv[6:], ["--disable-selinux", self.loop.path])
        with open(os.path.join(self.bed.dir, "bootc-keys")) as f:
            self.assertEqual(f.read(), AUTHORIZED_KEYS)


class RealIronicBootcTests(BootcDeployBed):
    """Ironic's ``bootc`` deploy interface drives ``execute_bootc_install`` on our agent,
    the image in a registry that wants a password."""

    async def test_deploy(self) -> None:
        """The node's image_pull_secret is the registry token (base64 of user:password,
        no colon): Ironic hands it on, the image is pulled, its bootc runs on the disk
        with the node's instance_info options, the config drive follows."""
        drive = os.path.join(self.bed.dir, "configdrive.img")
        with open(drive, "wb") as f:
            f.truncate(2 * 1024 * 1024)
        await self.runner.execute("mkfs.vfat", "-n", "config-2", drive)
        with open(drive, "rb") as f:
            drive_bytes = f.read()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        node, log = await self.deploy(token, "active", configdrive=base64.b64encode(
            gzip.compress(drive_bytes)).decode())
        self.assertIsNone(node["last_error"])
        self.assertEqual(node["deploy_interface"], "bootc")

        # Ironic's own step called the agent's, with the image and the pull secret.
        self.assertIn("Executing deploy step execute_bootc_install", log)
        self.assert_stand_in_ran(log)
        # The registry wants the password: the manifest was served, so the secret came.
        requests = self.bed.registry_requests()
        self.assertTrue(any('/manifests/1 HTTP/1.1" 200' in line for line in requests),
                        requests)
        # The agent's podman read the private /etc/containers: its no_pivot_root setting
        # is there, not on this machine.
        self.assertTrue(os.path.exists(os.path.join(self.etc, "containers.conf.d",
                                                    "01-ipa.conf")))

        layout = await self.disk_layout()
        self.assertEqual([p.name for p in layout.partitions],
                         ["BIOS-BOOT", "EFI-SYSTEM", "root", "config-2"])
        with open(self.loop.path, "rb") as f:
            f.seek(layout.partitions[-1].start)
            self.assertEqual(f.read(len(drive_bytes)), drive_bytes)

    async def test_user_password_pull_secret(self) -> None:
        """An image_pull_secret of the form user:password: Ironic 39 sends the password
        alone (its image services' convention), which is no registry token, so podman
        cannot pull and the deploy fails with the agent's message; the disk is untouched."""
        node, log = await self.deploy(f"{USER}:{PASSWORD}", "deploy failed")
        self.assertIn("Failed to pull container image", node["last_error"])
        self.assertIsNone(self.stand_in_argv())
        self.assertFalse(any('/manifests/1 HTTP/1.1" 200' in line
                             for line in self.bed.registry_requests()))
        self.assertEqual((await self.disk_layout()).partitions, ())


class RealIronicAutodetectTests(BootcDeployBed):
    """Ironic's ``autodetect`` deploy interface asks the registry itself (its OCI client,
    HTTPS first, plain HTTP once ``[oci]permit_fallback_to_http_transport`` allows it),
    finds a container image with no disk type, switches the node to ``bootc`` and deploys
    through our agent. The registry wants no password here: with htpasswd (Basic) auth,
    Ironic's client needs a user and a password (``image_pull_secret`` ``user:password``),
    which its bootc step then cuts down to the password, which podman cannot use (see
    ``test_user_password_pull_secret``)."""

    registry_password = None
    push_index = True
    ironic_options = {
        "DEFAULT": {"enabled_deploy_interfaces": "direct,custom-agent,bootc,autodetect",
                    "autodetect_deploy_interfaces": "bootc,direct"},
        "oci": {"permit_fallback_to_http_transport": True}}

    async def test_autodetect(self) -> None:
        node, log = await self.deploy(None, "active", deploy_interface="autodetect")
        self.assertIsNone(node["last_error"])
        self.assertIn("autodetect switching to deploy interface: bootc",
                      "\n".join(self.ironic.log_lines("INFO")))
        self.assert_stand_in_ran(log)
        # Ironic's own requests (python-requests) found the manifest over plain HTTP.
        requests = self.bed.registry_requests()
        self.assertTrue(any("python-requests" in line and '/manifests/1 HTTP/1.1" 200'
                            in line for line in requests), requests)
        print(f"  deploy_interface once active: {node['deploy_interface']}")
