"""A VM behind a Redfish BMC for the end-to-end test: libvirt (``qemu:///system``, TCG) and
sushy-tools' emulator (``.venv-sushy``, made by ``tests/ironic/setup-sushy.sh``).

``LibvirtBMC.start`` starts ``virtlogd`` and ``libvirtd`` as daemons when none runs (this
machine kind has no systemd to start them), defines the storage pool ``default`` sushy copies
inserted media into when there is none, defines one domain and starts the emulator on a free
port of 127.0.0.1. ``stop`` undoes exactly what ``start`` did: the domain destroyed and
undefined, the pool it defined removed, the emulator and the daemons it started stopped.

The domain: ``type='qemu'`` (KVM opens here but its guests die), no ``<kernel>`` (a
direct-kernel-boot domain ignores Redfish boot-device changes), an empty SATA CD-ROM for
virtual media, file-backed virtio and NVMe disks with serials, the serial console in a file
(appended to across power cycles), one virtio NIC on QEMU's user network: the guest reaches
this machine's loopback services (Ironic, the image server) at ``GUEST_HOST`` (the user
network's alias of the host) and the host reaches the guest's agent on
``127.0.0.1:agent_port``; optionally a second NIC on a user network of its own with
``restrict=on``. Nothing is bridged to this machine's network. (QEMU's ``guestfwd`` with a
command would keep the guest off everything else, but libvirt's seccomp sandbox forbids QEMU
to spawn it: the guest died on its first connection.)
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import signal
import sys
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from tests.processes import ROOT, Child, free_port, poll, sleep

SUSHY_VENV = os.path.join(ROOT, ".venv-sushy")
OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"
SEABIOS = "/usr/share/seabios/bios-256k.bin"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
LIBVIRT_LOGS = "/var/log/libvirt"
QEMU_USER = "libvirt-qemu"
"""The user libvirtd's QEMU driver is built to run guests as (Debian); it must exist."""
GUEST_HOST = "10.0.2.2"
"""This machine's 127.0.0.1 as the guest sees it (QEMU's user network)."""


def unavailable() -> str | None:
    """Why a libvirt VM behind sushy-tools cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "libvirt's qemu:///system and its daemons need root"
    if not os.access(os.path.join(SUSHY_VENV, "bin", "sushy-emulator"), os.X_OK):
        return "no sushy-tools: run tests/ironic/setup-sushy.sh (makes .venv-sushy)"
    missing = [tool for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64",
                                 "mkisofs") if shutil.which(tool) is None]
    missing += [path for path in (OVMF, SEABIOS, "/usr/lib/ISOLINUX/isolinux.bin")
                if not os.path.exists(path)]
    if missing:
        return f"missing {', '.join(missing)}: run tests/ironic/setup-sushy.sh"
    return None


@dataclass(frozen=True)
class VMDisk:
    """A file-backed disk: ``bus`` is ``virtio`` or ``nvme``."""

    path: str
    bus: str
    serial: str
    size: int


async def virsh(*args: str, check: bool = True) -> str:
    """``virsh -c qemu:///system ARGS``: its output; AssertionError when it fails."""
    child = Child(["virsh", "-q", "-c", "qemu:///system", *args])
    code = await child.ended
    output = child.output.decode(errors="replace")
    if check and code != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed ({code}): {output.strip()}")
    return output


def _id_taken(number: int) -> bool:
    """Whether ``number`` is a user or group id on this machine."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False


def _pid_alive(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


@dataclass
class LibvirtBMC:
    """One domain named ``name`` with ``disks``, its files in ``directory``."""

    directory: str
    name: str
    disks: Sequence[VMDisk]
    mac: str
    memory_mb: int = 1024
    second_mac: str | None = None
    """A second NIC on a network of its own (no forwards): a port inspection creates."""
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    agent_port: int = field(default_factory=free_port)
    sushy_port: int = field(default_factory=free_port)
    console_path: str = ""
    _started: list[str] = field(default_factory=list)
    _sushy: Child | None = None

    @property
    def redfish_address(self) -> str:
        return f"http://127.0.0.1:{self.sushy_port}"

    @property
    def system_id(self) -> str:
        return f"/redfish/v1/Systems/{self.uuid}"

    def domain_xml(self) -> str:
        """The domain: see the module docstring."""
        disks, extra = [], []
        for number, disk in enumerate(self.disks):
            if disk.bus == "virtio":
                disks.append(
                    "<disk type='file' device='disk'><driver name='qemu' type='raw' "
                    f"cache='unsafe'/><source file={quoteattr(disk.path)}/>"
                    f"<target dev='vd{chr(97 + number)}' bus='virtio'/>"
                    f"<serial>{disk.serial}</serial></disk>")
            else:                      # libvirt 9.0 has no NVMe disk bus: QEMU's own device
                extra += ["-drive", f"file={disk.path},if=none,id=nvme{number},format=raw,"
                                    "cache=unsafe",
                          "-device", f"nvme,drive=nvme{number},serial={disk.serial},"
                                    f"bus=pci.0,addr={0x1d - number:#x}"]
        nic = f"user,id=e2enet,hostfwd=tcp:127.0.0.1:{self.agent_port}-:9999"
        extra += ["-netdev", nic, "-device",
                  f"virtio-net-pci,netdev=e2enet,mac={self.mac},romfile=,bus=pci.0,addr=0x1e"]
        if self.second_mac:
            extra += ["-netdev", "user,id=e2enet2,restrict=on,net=10.0.3.0/24", "-device",
                      f"virtio-net-pci,netdev=e2enet2,mac={self.second_mac},romfile=,"
                      "bus=pci.0,addr=0x1c"]
        args = "".join(f"<qemu:arg value={quoteattr(arg)}/>" for arg in extra)
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{self.name}</name><uuid>{self.uuid}</uuid>
  <memory unit='MiB'>{self.memory_mb}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><loader>{SEABIOS}</loader>
      <boot dev='hd'/></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {''.join(disks)}
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <serial type='file'><source path={quoteattr(self.console_path)} append='on'/>
      <target port='0'/></serial>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{args}</qemu:commandline>
</domain>
"""

    def console(self) -> str:
        """The serial console so far."""
        try:
            with open(self.console_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    async def start(self) -> None:
        """Daemons, pool, domain (defined, powered off) and the emulator; see the module."""
        os.makedirs(self.directory, exist_ok=True)
        self.console_path = self.console_path or os.path.join(self.directory, "console.log")
        for disk in self.disks:
            with open(disk.path, "wb") as f:
                f.truncate(disk.size)
            if disk.bus != "virtio":        # not libvirt's: QEMU (libvirt's user) opens it
                os.chmod(disk.path, 0o666)
        await self._daemons()
        pools = await virsh("pool-list", "--all", "--name")
        if "default" not in pools.split():
            target = os.path.join(self.directory, "pool")
            os.makedirs(target, exist_ok=True)
            await virsh("pool-define-as", "default", "dir", "--target", target)
            self._started.append("pool")
        if "default" not in (await virsh("pool-list", "--name")).split():
            await virsh("pool-start", "default")
        xml = os.path.join(self.directory, "domain.xml")
        with open(xml, "w") as f:
            f.write(self.domain_xml())
        await virsh("define", xml)
        self._started.append("domain")
        await self._start_sushy()

    async def _daemons(self) -> None:
        # Where virtlogd and the QEMU driver write their logs: Debian's libvirt-daemon-system
        # makes it, and setup-sushy.sh installs without it (no default network, no services).
        os.makedirs(os.path.join(LIBVIRT_LOGS, "qemu"), mode=0o700, exist_ok=True)
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"),
                                ("libvirtd", "/run/libvirtd.pid")):
            if _pid_alive(pidfile) is None:
                # /dev/kvm opens here but KVM hangs libvirtd's QEMU probe (and kills guests):
                # libvirtd and its QEMUs see /dev/null there, in a mount namespace of their
                # own. PID 1 may not reap orphans: libvirtd runs under tests/reaper.py, which
                # reaps the QEMUs it double-forks (else it waits on their zombies).
                binary = shutil.which(daemon) or daemon
                if daemon == "virtlogd":
                    child = Child([binary, "-d"])
                    if await child.ended != 0:
                        raise AssertionError(f"virtlogd -d failed: {child.output.decode()}")
                else:
                    reaper = os.path.join(ROOT, "tests", "reaper.py")
                    namespace = self._libvirtd_namespace()
                    Child(["setsid", "unshare", "--mount", "--propagation", "private", "sh",
                           "-c", f"{namespace} && exec {sys.executable} {reaper} {binary}"])
                await poll(lambda pidfile=pidfile: _pid_alive(pidfile), timeout=20)
                self._started.append(daemon)
        await poll(lambda: os.path.exists(LIBVIRT_SOCKET), timeout=20)

    def _libvirtd_namespace(self) -> str:
        """Shell commands run in libvirtd's own mount namespace before it starts.

        /dev/kvm is masked (see ``_daemons``). On a machine without Debian's libvirt-daemon-system
        (setup-sushy.sh installs without recommends), there is no ``libvirt-qemu`` user and
        no qemu.conf, and libvirtd's QEMU driver refuses to start: libvirtd then sees, in
        its namespace only, that user and group added to copies of /etc/passwd and
        /etc/group, and an /etc/libvirt in this test's directory whose qemu.conf runs the
        guest as root. The machine's own files are not changed.
        """
        commands = ["if [ -e /dev/kvm ]; then mount --bind /dev/null /dev/kvm; fi"]
        try:
            pwd.getpwnam(QEMU_USER)
            return commands[0]
        except KeyError:
            pass
        etc = os.path.abspath(os.path.join(self.directory, "etc"))
        shutil.copytree("/etc/libvirt", os.path.join(etc, "libvirt"), dirs_exist_ok=True)
        with open(os.path.join(etc, "libvirt", "qemu.conf"), "w") as f:
            f.write('user = "root"\ngroup = "root"\n')
        uid = next(n for n in range(64055, 65000) if not _id_taken(n))
        for name, line in (("passwd", f"{QEMU_USER}:x:{uid}:{uid}:Libvirt Qemu:"
                                      "/var/lib/libvirt:/usr/sbin/nologin\n"),
                           ("group", f"{QEMU_USER}:x:{uid}:\n")):
            copy = os.path.join(etc, name)
            shutil.copyfile(os.path.join("/etc", name), copy)
            with open(copy, "a") as f:
                f.write(line)
            commands.append(f"mount --bind {shlex.quote(copy)} /etc/{name}")
        commands.append(f"mount --bind {shlex.quote(os.path.join(etc, 'libvirt'))} "
                        "/etc/libvirt")
        return " && ".join(commands)

    async def _start_sushy(self) -> None:
        config = os.path.join(self.directory, "sushy.conf")
        with open(config, "w") as f:
            f.write(f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n"
                    f"SUSHY_EMULATOR_LISTEN_PORT = {self.sushy_port}\n"
                    f"SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'\n"
                    f"SUSHY_EMULATOR_ALLOWED_INSTANCES = [{self.uuid!r}]\n"
                    f"SUSHY_EMULATOR_IGNORE_BOOT_DEVICE = False\n"
                    f"SUSHY_EMULATOR_BOOT_LOADER_MAP = {{\n"
                    f"    'UEFI': {{'x86_64': {OVMF!r}}},\n"
                    f"    'Legacy': {{'x86_64': {SEABIOS!r}}}}}\n")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
               "PYTHONUNBUFFERED": "1"}
        self._sushy = Child([os.path.join(SUSHY_VENV, "bin", "sushy-emulator"),
                             "--config", config], env=env)
        import treq

        async def answering() -> bool:
            if self._sushy is not None and self._sushy.ended.called:
                raise AssertionError("sushy-emulator ended:\n"
                                     + self._sushy.output.decode(errors="replace")[-3000:])
            response = await treq.get(self.redfish_address + self.system_id, timeout=5,
                                      persistent=False)
            await response.content()
            return bool(response.code == 200)
        await poll(answering, timeout=60, interval=0.5)

    @property
    def sushy_output(self) -> str:
        return self._sushy.output.decode(errors="replace") if self._sushy else ""

    async def stop(self) -> None:
        """Undo what ``start`` did (see the module docstring)."""
        if self._sushy is not None and not self._sushy.ended.called:
            self._sushy.process.signalProcess("TERM")
            await self._sushy.ended
        if "domain" in self._started:
            await virsh("destroy", self.name, check=False)
            await virsh("undefine", self.name, "--nvram", check=False)
        if "pool" in self._started:
            await virsh("pool-destroy", "default", check=False)
            await virsh("pool-undefine", "default", check=False)
        for daemon, pidfile in (("libvirtd", "/run/libvirtd.pid"),
                                ("virtlogd", "/run/virtlogd.pid")):
            pid = _pid_alive(pidfile) if daemon in self._started else None
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if _pid_alive(pidfile) != pid:
                        break
                    await sleep(0.1)
        self._started.clear()
