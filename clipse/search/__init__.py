"""The search: ``run_search(SearchOptions)`` and ``python -m clipse.search`` (``command``) over
an Optuna study (``study``, ``journal``, ``samplers``), a search space (``spaces``), the
objective a worker runs per trial (``objective``), the progress line (``progress``), confirmation
of the best trials (``confirm``) and runs planned by confirmation and the final report
(``planned_runs``)."""

from clipse.search.command import SearchOptions, SearchResult, main, run_search

__all__ = ["SearchOptions", "SearchResult", "main", "run_search"]
