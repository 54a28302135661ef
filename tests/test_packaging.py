"""pyproject.toml lists every package of ipa_twisted (the ramdisk installs the built wheel);
ramdisk/build.sh's agent variants."""

from __future__ import annotations

import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.processes import Child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagingTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
        found = {os.path.relpath(directory, ROOT).replace(os.sep, ".")
                 for directory, _, files in os.walk(os.path.join(ROOT, "ipa_twisted"))
                 if "__init__.py" in files}
        self.assertEqual(found - listed, set(), "packages missing from pyproject.toml: a "
                         "wheel (and the ramdisk) would not hold them")
        self.assertEqual(listed - found - {"twisted.plugins"}, set())


class RamdiskBuildOptionsTests(TestCase):
    """ramdisk/build.sh's agent variants (bench/boot.py boots both), without building."""

    timeout = 60

    async def build(self, *args: str) -> tuple[int | None, str]:
        """build.sh's exit code and output (its option parsing only: no build)."""
        child = Child(["bash", os.path.join(ROOT, "ramdisk", "build.sh"), *args])
        self.addCleanup(child.stop, "KILL")
        code = await child.ended
        return code, child.output.decode()

    async def test_reference_variant_is_a_build_of_its_own(self) -> None:
        ours = await self.build("--print-hash")
        reference = await self.build("--agent", "reference", "--print-hash")
        self.assertEqual((ours[0], reference[0]), (0, 0), ours[1] + reference[1])
        self.assertRegex(ours[1].strip(), r"^[0-9a-f]{16}$")
        self.assertNotEqual(ours[1], reference[1])
        self.assertEqual(await self.build("--agent", "ours", "--print-hash"), ours)

    async def test_unknown_agent_is_refused(self) -> None:
        code, output = await self.build("--agent", "other", "--print-hash")
        self.assertNotEqual(code, 0)
        self.assertIn("--agent is ours or reference, not other", output)

    def test_init_starts_the_launcher_which_the_build_installs(self) -> None:
        with open(os.path.join(ROOT, "ramdisk", "init")) as f:
            init = f.read()
        with open(os.path.join(ROOT, "ramdisk", "build.sh")) as f:
            script = f.read()
        self.assertIn("/usr/local/bin/ipa-agent &", init)
        self.assertIn('"$root/usr/local/bin/ipa-agent"', script)
        self.assertIn("-S -m ipa_twisted.startup.launch -n --pidfile= ipa", script)
