"""Setting the system clock from ``ntp_server`` with chrony or ntpdate.

Only the software clock is set, as with the reference agent. Tests replace the runner, so
nothing here ever changes the clock of the machine running them.
"""

from __future__ import annotations

from twisted.logger import Logger

from ipa_twisted import errors
from ipa_twisted.config import AgentConfig
from ipa_twisted.context import CommandRunner
from ipa_twisted.process import ProcessExecutionError

log = Logger()
SYNC_TIMEOUT = 60.0


def time_method(runner: CommandRunner) -> str | None:
    """``chronyd`` when chrony is installed, else ``ntpdate`` when that is, else None."""
    if runner.which("chronyd"):
        return "chronyd"
    if runner.which("ntpdate"):
        return "ntpdate"
    return None


async def sync_clock(runner: CommandRunner, config: AgentConfig,
                     ignore_errors: bool = False) -> bool:
    """Set the clock from ``config.ntp_server``; True if it was set.

    Nothing happens without an NTP server. Failures raise ClockSyncError unless
    ``ignore_errors`` (then they are logged and False is returned).
    """
    server = config.ntp_server
    if not server:
        return False
    method = time_method(runner)
    try:
        if method == "chronyd":
            # A running chronyd would fight the one-shot sync: stop it first.
            await runner.execute("chronyc", "shutdown", check_exit_code=[0, 1],
                                 timeout=SYNC_TIMEOUT)
            await runner.execute("chronyd", "-q", f"server {server} iburst",
                                 timeout=SYNC_TIMEOUT)
        elif method == "ntpdate":
            await runner.execute("ntpdate", server, timeout=SYNC_TIMEOUT)
        else:
            raise errors.ClockSyncError(
                'Unable to sync clock, available methods of "ntpdate" or "chrony" not found.')
    except (ProcessExecutionError, errors.ClockSyncError) as e:
        error = e if isinstance(e, errors.ClockSyncError) else errors.ClockSyncError(
            f"Error syncing the clock with {server} using {method}: {e}")
        if ignore_errors:
            log.warn("Clock not set: {error}", error=str(error))
            return False
        raise error from e
    log.info("Clock set from {server} with {method}", server=server, method=method)
    return True
