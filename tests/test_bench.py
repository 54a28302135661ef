"""What bench/ reads from Ironic's log, and how its table decides a target was met."""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys
from types import ModuleType

from twisted.trial.unittest import TestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name: str) -> ModuleType:
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)   # real_ironic imports compare as a sibling
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


NODE = "da535c46-a66b-4ba2-994f-cb7f8f5b540b"
OTHER = "68722f5e-8a21-4679-b8c2-c82b1665c515"
STEP = "{'step': 'write_image', 'priority': 80, 'abortable': True, 'argsinfo': None, " \
       "'interface': 'deploy'}"
REQ = "[None req-ffbaa1b7-3282-4dea-bf05-13f93508ac56 - - - - - -]"
# INFO lines of Ironic 39's conductor for one direct deploy (from a bench run), with an
# earlier deploy of the same node and another node's lines mixed in.
LOG = [
    f"2026-12-02 02:16:40.000 1 INFO ironic.conductor.task_manager {REQ} Node {NODE} moved "
    'to provision state "active" from state "deploying"; target provision state is "None"',
    f"2026-12-02 02:16:58.947 1 INFO ironic.conductor.task_manager {REQ} Node {NODE} moved "
    'to provision state "wait call-back" from state "deploying"; target provision state '
    'is "active"',
    f"2026-12-02 02:16:59.100 1 INFO ironic.conductor.task_manager {REQ} Node {OTHER} moved "
    'to provision state "wait call-back" from state "deploying"; target provision state '
    'is "active"',
    f"2026-12-02 02:17:00.247 1 INFO ironic.conductor.deployments {REQ} Executing {STEP} on "
    f"node {NODE}",
    f"2026-12-02 02:17:00.292 1 INFO ironic.conductor.task_manager {REQ} Node {NODE} moved "
    'to provision state "wait call-back" from state "deploying"; target provision state '
    'is "active"',
    f"2026-12-02 02:17:05.280 1 INFO ironic.drivers.modules.agent_base {REQ} Agent on node "
    f"{NODE} returned deploy command success, moving to next step",
    f"2026-12-02 02:17:05.290 1 INFO ironic.drivers.modules.agent_base {REQ} Agent on node "
    f"{NODE} returned deploy command success, moving to next step",
    f"2026-12-02 02:17:05.409 1 INFO ironic.conductor.task_manager {REQ} Node {NODE} moved "
    'to provision state "active" from state "deploying"; target provision state is "None"',
]


def _at(clock: str) -> float:
    return datetime.datetime.strptime("2026-12-02 " + clock, "%Y-%m-%d %H:%M:%S.%f").timestamp()


class ConductorTimesTests(TestCase):
    """``real_ironic.conductor_times``: the conductor's view of one deploy."""

    def setUp(self) -> None:
        try:
            self.times = _load("real_ironic").conductor_times
        except ImportError as e:   # bench's own imports: the test harness, Twisted
            raise self.skipTest(f"bench/real_ironic.py cannot be imported: {e}")

    def test_one_deploy(self) -> None:
        found = self.times(LOG, NODE, _at("02:16:58.500"))
        self.assertEqual(found, {"wait": _at("02:16:58.947"), "step_start": _at("02:17:00.247"),
                                 "step_done": _at("02:17:05.280"),
                                 "active": _at("02:17:05.409")})

    def test_earlier_events_and_other_nodes_are_left_out(self) -> None:
        found = self.times(LOG, OTHER, _at("02:16:58.500"))
        self.assertEqual(found, {"wait": _at("02:16:59.100")})
        self.assertEqual(self.times(LOG, NODE, _at("02:17:06.000")), {})

    def test_a_success_before_write_image_is_not_its_end(self) -> None:
        early = [line.replace("02:17:05.280", "02:16:59.000") for line in LOG[5:6]]
        found = self.times(LOG[:3] + early + LOG[3:5], NODE, _at("02:16:58.500"))
        self.assertNotIn("step_done", found)
        self.assertEqual(found["step_start"], _at("02:17:00.247"))


class ImageBytesTests(TestCase):
    """``real_ironic.IMAGE_BYTES``: each agent's own time for the image's bytes."""

    def test_both_agents_lines(self) -> None:
        try:
            patterns = _load("real_ironic").IMAGE_BYTES
        except ImportError as e:
            raise self.skipTest(f"bench/real_ironic.py cannot be imported: {e}")
        lines = {   # from a bench run's agent logs
            "ours": "2026-12-02T05:31:29+0000 [ipa_twisted.images.pipeline#info] Wrote image "
                    "disk.raw (raw, 2147483648 bytes) to /dev/loop0 in 13.3 s; sha256 "
                    "043bee26b97f53e0 verified",
            "reference": "2026-12-02 05:31:58.713 11988 INFO ironic_python_agent.extensions."
                         "standby [-] Image streamed onto device /dev/loop0 in "
                         "18.956987857818604 seconds for 2147483648 bytes. Server originally "
                         "reported 2147483648."}
        for side, line in lines.items():
            found = patterns[side].search(line)
            self.assertIsNotNone(found, side)
            self.assertEqual(float(found.group(1)), {"ours": 13.3,
                                                     "reference": 18.956987857818604}[side])
        self.assertIsNone(patterns["ours"].search(lines["reference"]))


class RowTests(TestCase):
    """``compare.Row.met``: targets on the ratio or on our own figure."""

    def setUp(self) -> None:
        self.Row = _load("compare").Row

    def test_ratio_targets(self) -> None:
        self.assertTrue(self.Row("t", [4.0, 5.0, 6.0], [10.0], target="<= 0.5x",
                                 max_ratio=0.5).met())
        self.assertFalse(self.Row("t", [6.0], [10.0], target="<= 0.5x", max_ratio=0.5).met())
        self.assertTrue(self.Row("t", [9.5], [10.0], target=">= 0.9x", min_ratio=0.9).met())

    def test_own_figure_target_and_no_target(self) -> None:
        self.assertTrue(self.Row("t", [2.9], [], target="ours <= 3", max_ours=3.0).met())
        self.assertIsNone(self.Row("t", [1.0], [2.0]).met())

    def test_a_figure_not_measured_misses_its_target(self) -> None:
        self.assertFalse(self.Row("t", [], [10.0], target="<= 0.5x", max_ratio=0.5).met())
        self.assertFalse(self.Row("t", [1.0], [], target="<= 0.5x", max_ratio=0.5).met())

    def test_errors_take_the_worst_run(self) -> None:
        row = self.Row("t", [0.0, 3.0, 0.0], [], target="ours 0", max_ours=0.0, use_max=True)
        self.assertFalse(row.met())
