"""failures_as: a program's failure raised as the agent's error."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted import errors
from ipa_twisted.process import CommandNotFoundError, ProcessExecutionError, failures_as


def _failure() -> ProcessExecutionError:
    return ProcessExecutionError(["mdadm", "--create"], 2, b"out\xff", b"busy")


class FailuresAsTests(SynchronousTestCase):
    def test_message_prefix(self) -> None:
        failure = _failure()
        with self.assertRaises(errors.SoftwareRAIDError) as caught:
            with failures_as(errors.SoftwareRAIDError, "Failed to create md device /dev/md0"):
                raise failure
        self.assertEqual(caught.exception.details,
                         f"Failed to create md device /dev/md0: {failure}")
        self.assertIs(caught.exception.__cause__, failure)

    def test_message_placeholder(self) -> None:
        failure = _failure()
        with self.assertRaises(errors.CommandExecutionError) as caught:
            with failures_as(errors.CommandExecutionError,
                             "Installing GRUB2 on {dev} failed with {error}."):
                raise failure
        self.assertEqual(caught.exception.details,
                         f"Installing GRUB2 on {{dev}} failed with {failure}.")

    def test_make_from_failure(self) -> None:
        with self.assertRaises(errors.ImageWriteError) as caught:
            with failures_as(make=lambda e: errors.ImageWriteError(
                    "/dev/sda", e.exit_code, e.stdout_text, e.stderr_text)):
                raise _failure()
        self.assertEqual(caught.exception.details,
                         "Writing image to device /dev/sda failed with exit code 2. "
                         "stdout: out\ufffd. stderr: busy")

    def test_subclasses_translated(self) -> None:
        with self.assertRaises(errors.ISCSIError):
            with failures_as(errors.ISCSIError, "Unable to start the ISCSI daemon"):
                raise CommandNotFoundError(["tgtd"])

    def test_other_errors_pass(self) -> None:
        with self.assertRaises(KeyError):
            with failures_as(errors.ISCSIError, "x"):
                raise KeyError("k")

    def test_no_error_nothing_raised(self) -> None:
        with failures_as(errors.ISCSIError, "x"):
            pass

    def test_needs_exactly_one_way(self) -> None:
        with self.assertRaises(TypeError):
            with failures_as():
                pass
