"""Utilities every layer may use: the one user-error type and its exit status (``errors``),
dataclass fields that carry their flag (``fields``), where things live (``paths``), locks on
shared files (``locks``), markdown tables (``tables``) and safe checkpoint reads
(``checkpoints``). Nothing here imports another part of clipse."""
