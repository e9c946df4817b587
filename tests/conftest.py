"""The test suite's own session hooks (a release run started in this checkout never collects tests/).

As root the remote tests start the loopback SLURM cluster + sshd themselves (tests/cluster/loopback.py); the
controller stops what that start started once the session is over, and leaves a cluster it found running.
"""

from __future__ import annotations

import sys

import pytest
from cluster.loopback import begin_test_session, end_test_session


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # an xdist worker ends long before its session does


def pytest_configure(config: pytest.Config) -> None:
    if _controller(config):
        begin_test_session()


def pytest_unconfigure(config: pytest.Config) -> None:
    """After every worker has exited (so no test still uses the cluster), also after Ctrl-C."""
    if _controller(config):
        said = end_test_session()
        if said:
            print(f"\n[day0 tests] {said}", file=sys.stderr, flush=True)
