"""The search spaces that ship with clipse: one YAML file per space (``clipse.search.spaces``
reads them; a package so that they install with clipse, not only in a clone)."""
