"""``python -m ipa_twisted.startup.launch``: twistd knowing only the agent's service maker."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import treq
from twisted import plugin
from twisted.plugin import IPlugin
from twisted.scripts._twistd_unix import ServerOptions as UnixServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipa_twisted import tap
from ipa_twisted.startup import launch
from tests.processes import Child, child_env, free_port, poll

LAUNCH = [sys.executable, "-m", "ipa_twisted.startup.launch"]


class LauncherOptionsTests(SynchronousTestCase):
    def test_only_the_agents_service_maker_without_reading_plugin_caches(self) -> None:
        def no_cache(*args: object, **kwargs: object) -> None:
            raise AssertionError("the launcher read twistd's plugin caches")
        self.patch(plugin, "getCache", no_cache)
        self.patch(UnixServerOptions, "_getPlugins", staticmethod(no_cache))
        cmdline = self.mktemp()
        with open(cmdline, "w") as f:
            f.write("\n")
        options = launch.ServerOptions()
        options.parseOptions(["-n", "--pidfile=", "ipa", "--standalone",
                              "--no-default-config-files", "--cmdline-path", cmdline])
        self.assertEqual(options.subCommand, "ipa")
        self.assertIsInstance(options.subOptions, tap.Options)
        self.assertTrue(options.subOptions.config.standalone)
        self.assertEqual(list(options.loadedPlugins), ["ipa"])
        self.assertEqual(options.loadedPlugins["ipa"].tapname, "ipa")
        self.assertTrue(IPlugin.providedBy(options.loadedPlugins["ipa"]))

    def test_other_service_makers_are_unknown(self) -> None:
        options = launch.ServerOptions()
        self.assertEqual([name for name, *_ in options.subCommands], ["ipa"])


class GarbageCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(lambda: gc.set_threshold(*before))
        gc.set_threshold(launch.STARTUP_THRESHOLD, 10, 10)   # as importing the launcher did

    def test_usual_thresholds_are_back_once_the_reactor_runs(self) -> None:
        from twisted.internet import reactor
        started: list[object] = []
        when_running: list[object] = []
        self.patch(reactor, "callWhenRunning",
                   lambda f, *a, **kw: when_running.append(f))
        self.patch(launch.twistd, "runApp", started.append)
        self.patch(launch, "_thresholds", (700, 10, 10))
        launch.run_app("config")
        self.assertEqual(started, ["config"])
        self.assertEqual(gc.get_threshold()[0], launch.STARTUP_THRESHOLD)  # during start-up
        self.assertEqual(when_running, [launch.restore_gc_thresholds])
        when_running[0]()  # type: ignore[operator]
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_main_restores_them_when_twistd_fails(self) -> None:
        def fail(*args: object) -> None:
            raise SystemExit(2)
        self.patch(launch.app, "run", fail)
        self.patch(launch, "_thresholds", (700, 10, 10))
        self.assertRaises(SystemExit, launch.main)
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_the_launcher_raises_the_young_generation_when_imported(self) -> None:
        def child(code: str) -> list[str]:
            return subprocess.run([sys.executable, "-c", code], env=child_env(),
                                  capture_output=True, text=True, check=True).stdout.split()
        (usual,) = child("import gc; print(gc.get_threshold()[0])")
        self.assertEqual(
            child("import gc, ipa_twisted.startup.launch as l; "
                  "print(gc.get_threshold()[0], l._thresholds[0], gc.isenabled())"),
            [str(launch.STARTUP_THRESHOLD), usual, "True"])


class LauncherProcessTests(TestCase):
    timeout = 90

    async def test_serves_the_api_and_stops_cleanly(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cmdline = os.path.join(directory, "cmdline")
        with open(cmdline, "w") as f:
            f.write("\n")
        port = free_port()
        agent = Child(LAUNCH + ["-n", "--pidfile=", "ipa", "--standalone",
                                "--no-default-config-files", "--cmdline-path", cmdline,
                                "--listen", f"127.0.0.1:{port}"], child_env())
        self.addCleanup(agent.stop, "KILL")

        async def answering() -> bool:
            response = await treq.get(f"http://127.0.0.1:{port}/", timeout=2,
                                      persistent=False)
            await response.content()
            return bool(response.code == 200)
        await poll(answering, timeout=60, interval=0.2)
        await agent.stop("TERM")
        self.assertTrue(agent.stopped_cleanly, agent.output[-2000:])
