"""clipse: hyperparameter search and benchmarking for CLIP training with SANW losses."""

import os

# OpenMP threads that spin while waiting make CPU-bound torch processes two to eight times slower
# as soon as a second one shares their cores, and sleeping costs about a tenth alone
# (`python benchmarks/omp_wait_policy.py` on 2 cores, two default runs at once: 24.0 s spinning vs
# 11.8 s sleeping; alone 9.8 vs 10.7 s; an earlier run gave 128.6 vs 15.7 s at once).
# clipse routinely runs several processes per machine (local workers, SLURM jobs sharing a node,
# a report beside a search), so idle OpenMP threads sleep instead. This has to be set before
# torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"  # 0.2: tie-aware ranks (figures of 0.1 do not compare); CHANGELOG.md
