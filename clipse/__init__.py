"""clipse: hyperparameter search and benchmarking for CLIP training with SANW losses."""

import os

# OpenMP threads that spin while waiting make a CPU-bound torch process about eight times slower
# as soon as a second one shares its cores; sleeping costs nothing alone
# (`python benchmarks/omp_wait_policy.py`: two default runs at once 128.6 s vs 15.7 s on 2 cores).
# clipse routinely runs several processes per machine (local workers, SLURM jobs sharing a node,
# a report beside a search), so idle OpenMP threads sleep instead. This has to be set before
# torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
