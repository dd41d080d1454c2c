"""Why clipse sets OMP_WAIT_POLICY=PASSIVE (see clipse/__init__.py).

Times the same short training run (the default data and model, one epoch, all cores) alone and
as two copies at once, with OpenMP's waiting threads spinning (ACTIVE) and sleeping (PASSIVE),
side by side in one run. Runs use a temporary CLIPSE_CACHE that is warmed first.

    python benchmarks/omp_wait_policy.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_command(workdir: Path, name: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "clipse.train", "--epochs", str(epochs), "--no-progress",
            "--run-dir", str(workdir / name), "--registry", str(workdir / "registry.csv")]


def timed_runs(workdir: Path, policy: str, copies: int, epochs: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    started = time.perf_counter()
    processes = [subprocess.Popen(train_command(workdir, f"{policy}-{copies}-{i}", epochs), cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(copies)]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"training failed: {err.strip().splitlines()[-1]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-omp-bench-") as tmp:
        os.environ["CLIPSE_CACHE"] = tmp
        workdir = Path(tmp)
        timed_runs(workdir / "warm-up", "PASSIVE", 1, 1)  # generates and caches the dataset
        times = {(policy, copies): timed_runs(workdir, policy, copies, args.epochs)
                 for copies in (1, 2) for policy in ("ACTIVE", "PASSIVE")}
    print(f"{os.cpu_count()} cores; wall seconds for {args.epochs} epoch(s) of the default run")
    print("policy    alone   two at once   two/alone")
    for policy in ("ACTIVE", "PASSIVE"):
        alone, pair = times[(policy, 1)], times[(policy, 2)]
        print(f"{policy:8s} {alone:6.1f}   {pair:11.1f}   {pair / alone:9.2f}")
    print(f"PASSIVE/ACTIVE: alone {times[('PASSIVE', 1)] / times[('ACTIVE', 1)]:.2f}, "
          f"two at once {times[('PASSIVE', 2)] / times[('ACTIVE', 2)]:.2f}")


if __name__ == "__main__":
    main()
