"""clipse: hyperparameter search and benchmarking for CLIP training with SANW losses."""

__version__ = "0.1.0"
