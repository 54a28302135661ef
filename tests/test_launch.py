"""``python -m ipa_twisted.startup.launch``: twistd knowing only the agent's service maker."""

from __future__ import annotations

import gc
import os
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
    def test_collector_is_back_on_once_the_reactor_runs(self) -> None:
        from twisted.internet import reactor
        started: list[object] = []
        when_running: list[object] = []
        self.patch(reactor, "callWhenRunning",
                   lambda f, *a, **kw: when_running.append(f))
        self.patch(launch.twistd, "runApp", started.append)
        self.addCleanup(gc.enable)
        gc.disable()   # as importing the launcher did
        launch.run_app("config")
        self.assertEqual(started, ["config"])
        self.assertFalse(gc.isenabled())   # start-up (runApp) runs without it
        self.assertEqual(when_running, [gc.enable])
        when_running[0]()  # type: ignore[operator]
        self.assertTrue(gc.isenabled())

    def test_main_turns_it_back_on_when_twistd_fails(self) -> None:
        def fail(*args: object) -> None:
            raise SystemExit(2)
        self.patch(launch.app, "run", fail)
        self.addCleanup(gc.enable)
        gc.disable()
        self.assertRaises(SystemExit, launch.main)
        self.assertTrue(gc.isenabled())


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
