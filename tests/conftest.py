"""The test suite's own session hooks (a release run started in this checkout never collects tests/).

As root the remote tests start the loopback SLURM cluster + sshd themselves (tests/cluster/loopback.py); the
controller stops what that start started once the session is over, and leaves a cluster it found running.
"""

from __future__ import annotations

import signal
import sys

import pytest
from cluster.loopback import begin_test_session, end_test_session


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # an xdist worker ends long before its session does


def pytest_configure(config: pytest.Config) -> None:
    # The Ctrl-C tests send SIGINT to the commands they start. Started as a background job of a non-interactive
    # shell (`pytest ... &` in a script), this process and every child inherit SIGINT *ignored*, and the commands
    # rightly keep ignoring it (StopSignals leaves an ignored signal alone): those tests would test nothing but the
    # shell. Restored here (before xdist starts its workers, which inherit it), for the test processes only.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _controller(config):
        begin_test_session()


def pytest_unconfigure(config: pytest.Config) -> None:
    """After every worker has exited (so no test still uses the cluster), also after Ctrl-C."""
    if _controller(config):
        said = end_test_session()
        if said:
            print(f"\n[day0 tests] {said}", file=sys.stderr, flush=True)
