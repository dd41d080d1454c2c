"""The chaos soak's default schedule: faults of every kind during a local search, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROJECT


@pytest.mark.slow
@pytest.mark.soak
def test_the_default_chaos_schedule_loses_nothing():
    done = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "chaos.py")], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert summary["lost"] == 0 and summary["faults"] >= 15
    assert summary["by_kind"].get("kill-worker", 0) >= 1 and summary["restarts"] >= 2 and summary["retries"] >= 1
    assert summary["torn_tails_cut"] >= 1 and summary["epochs_retrained"] == 0


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.postgres
def test_the_chaos_schedule_with_storage_faults_loses_nothing():
    """The study in a real PostgreSQL server that is restarted, stopped briefly and stopped past
    the grace period, among killed workers and coordinators."""
    done = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "chaos.py"), "--storage", "postgres"],
                          capture_output=True, text=True, timeout=1200)
    if "needs root and Debian's postgresql" in done.stderr + done.stdout:
        from conftest import skip_or_fail

        skip_or_fail("PostgreSQL", "server binaries not installed, or not root (apt install postgresql)")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert summary["lost"] == 0 and summary["epochs_retrained"] == 0
    assert summary["by_kind"].get("pg-outage", 0) >= 1 and summary["by_kind"].get("pg-long-outage", 0) == 1
    assert summary["by_kind"].get("pg-restart", 0) >= 1
