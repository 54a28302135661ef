"""pyproject.toml lists every package of ipa_twisted (the ramdisk installs the built wheel)."""

from __future__ import annotations

import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

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
