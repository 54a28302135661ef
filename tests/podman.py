"""Real podman for tests: its storage, run state and configuration in a directory of the
test's own, a local image built from busybox-static, and a registry (Debian's
docker-registry on 127.0.0.1, optionally with a user and password) started by the test.

``PodmanBed.start(test)`` skips the test, saying why, when podman, docker-registry or a
static busybox is missing, when not root, or when podman cannot run a container here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.process import ProcessRunner
from tests.processes import Child, child_env, free_port

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"
tmp_dir = "{dir}/libpod-tmp"
{runtime}
"""
STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{dir}/storage"
runroot = "{dir}/run"
"""
REGISTRY_CONF = """\
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {dir}/registry
http:
  addr: 127.0.0.1:{port}
"""
REGISTRY_AUTH = """\
auth:
  htpasswd:
    realm: ipa-test
    path: {dir}/htpasswd
"""


def static_executable(path: str) -> bool:
    """Whether the ELF executable ``path`` has no program interpreter (statically linked)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:      # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3   # PT_INTERP
               for i in range(phnum))


def bcrypt_hash(password: str) -> str:
    """``password`` hashed with bcrypt by the C library's crypt (what htpasswd files hold)."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise SkipTest("no libcrypt to hash the registry's password")
    lib = ctypes.CDLL(name)
    lib.crypt_gensalt.restype = lib.crypt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
                                  ctypes.c_int]
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = lib.crypt(password.encode(), setting) if setting else None
    if not hashed or not hashed.startswith(b"$2"):
        raise SkipTest("libcrypt cannot make bcrypt hashes")
    return str(hashed.decode())


class PodmanBed:
    """podman with private storage and a registry; ``runner`` runs programs with them."""

    def __init__(self, directory: str, runner: ProcessRunner) -> None:
        self.dir = directory
        self.runner = runner
        self.registry: Child | None = None
        self.registry_host = ""

    @classmethod
    async def start(cls, test: TestCase) -> PodmanBed:
        """A bed for ``test`` (cleaned up with it), or SkipTest."""
        for program in ("podman", "docker-registry", "busybox"):
            if shutil.which(program) is None:
                raise SkipTest(f"{program} is not installed (podman, docker-registry and "
                               "busybox-static are in .ci/setup)")
        if os.geteuid() != 0:
            raise SkipTest("podman's storage and containers here need root")
        if not static_executable(shutil.which("busybox") or ""):
            raise SkipTest("busybox is dynamically linked: the test images hold busybox "
                           "alone (install busybox-static)")
        # Under /tmp and short: conmon's sockets live under it (a socket path holds at
        # most 107 bytes), and bootc's authorized keys are shared through /tmp.
        directory = tempfile.mkdtemp(prefix="ipa-podman-", dir="/tmp")
        # Hybrid cgroup hierarchies (cgroup v1 with a unified v2 holding controllers)
        # make crun refuse to start containers; runc copes, so it is used when present.
        runtime = 'runtime = "runc"' if shutil.which("runc") else ""
        conf, storage = (os.path.join(directory, "containers.conf"),
                         os.path.join(directory, "storage.conf"))
        with open(conf, "w") as f:
            f.write(CONTAINERS_CONF.format(dir=directory, runtime=runtime))
        with open(storage, "w") as f:
            f.write(STORAGE_CONF.format(dir=directory))
        registries = os.path.join(directory, "registries.conf")
        with open(registries, "w") as f:
            f.write("unqualified-search-registries = []\n")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "LC_ALL": "C", "LANG": "C", "CONTAINERS_CONF": conf,
               "CONTAINERS_STORAGE_CONF": storage, "CONTAINERS_REGISTRIES_CONF": registries}
        bed = cls(directory, ProcessRunner(reactor, reactor, base_env=env))
        test.addCleanup(bed.remove)
        await bed.build_image("localhost/ipa-test/probe:1", {}, ["/bin/busybox", "true"])
        try:
            await bed.runner.execute("podman", "run", "--rm", "--network=host",
                                     "localhost/ipa-test/probe:1", timeout=120)
        except Exception as e:
            raise SkipTest(f"podman cannot run a container on this machine: {e}")
        return bed

    async def build_image(self, name: str, files: Mapping[str, str],
                          command: Sequence[str]) -> None:
        """Image ``name``: busybox (with ``sh``, ``cat``, ``dd``, ``printf`` links), the
        executable ``files`` (path in the image: text) and the default ``command``."""
        rootfs = os.path.join(self.dir, "rootfs-" + name.replace("/", "_").replace(":", "_"))
        os.makedirs(os.path.join(rootfs, "bin"))
        shutil.copy(shutil.which("busybox") or "", os.path.join(rootfs, "bin", "busybox"))
        for applet in ("sh", "cat", "dd", "printf"):
            os.symlink("busybox", os.path.join(rootfs, "bin", applet))
        for path, text in files.items():
            full = os.path.join(rootfs, path.lstrip("/"))
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            os.chmod(full, 0o755)
        tarball = rootfs + ".tar"
        await self.runner.execute("tar", "-C", rootfs, "-cf", tarball, ".")
        cmd = "[" + ", ".join(f'"{word}"' for word in command) + "]"
        await self.runner.execute(
            "podman", "import", "--change", f"CMD {cmd}", "--change",
            "ENV PATH=/usr/local/bin:/usr/bin:/bin", tarball, name, timeout=120)

    async def start_registry(self, test: TestCase, *, user: str | None = None,
                             password: str | None = None) -> str:
        """A registry on 127.0.0.1 (``host:port``), with ``user``/``password`` if given."""
        port = free_port()
        config = REGISTRY_CONF.format(dir=self.dir, port=port)
        if user is not None and password is not None:
            with open(os.path.join(self.dir, "htpasswd"), "w") as f:
                f.write(f"{user}:{bcrypt_hash(password)}\n")
            config += REGISTRY_AUTH.format(dir=self.dir)
        path = os.path.join(self.dir, "registry.yml")
        with open(path, "w") as f:
            f.write(config)
        self.registry = Child([shutil.which("docker-registry") or "", "serve", path],
                              env=child_env())
        test.addCleanup(self.registry.stop)
        await self.registry.wait_for(rb"listening on", timeout=60)
        self.registry_host = f"127.0.0.1:{port}"
        # Plain HTTP: as an operator would say so of a registry of their own, in
        # registries.conf (programs that do not pass --tls-verify=false, like bootc's pull).
        with open(os.path.join(self.dir, "registries.conf"), "a") as f:
            f.write(f'[[registry]]\nlocation = "{self.registry_host}"\ninsecure = true\n')
        return self.registry_host

    async def push(self, local: str, remote: str, *, creds: str | None = None) -> None:
        """Push ``local`` to ``remote`` on the registry (as ``user:password`` ``creds``),
        then drop every local image."""
        await self.runner.execute("podman", "push", "--tls-verify=false",
                                  *([f"--creds={creds}"] if creds else []),
                                  local, remote, timeout=120)
        await self.runner.execute("podman", "rmi", "-a", "-f", timeout=120)

    def registry_requests(self) -> list[str]:
        """The registry's access log lines (one per request to its API)."""
        output = self.registry.output if self.registry is not None else b""
        return [line for line in output.decode(errors="replace").splitlines()
                if '"GET /v2/' in line or '"HEAD /v2/' in line]

    async def remove(self) -> None:
        """Remove the containers, images and the directory."""
        for argv in (("podman", "rm", "-a", "-f"), ("podman", "rmi", "-a", "-f")):
            try:
                await self.runner.execute(*argv, timeout=120)
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
