"""``python -m clipse.journal check|repair STUDY``: check or repair a study's journal file after a
crash (the journal's safety lives in ``clipse.search.journal``; docs/reference/failure-behaviour.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipse.search.journal import check_journal, repair_journal
from clipse.util.errors import UserError, cli_main, configure_logging
from clipse.util.paths import DEFAULT_STUDIES_DIR, StudyFolder


def journal_path(target: str, studies_dir: Path) -> Path:
    """A study's journal (``<studies dir>/<study>/journal.log``), or a journal file given by path."""
    given = Path(target)
    path = given if given.is_file() else StudyFolder.of(studies_dir, target).journal
    if not path.is_file():
        raise UserError(f"{target}: no such journal file or study in {studies_dir}")
    return path


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipse.journal",
                                     description="Check or repair a study's journal file after a crash.")
    parser.add_argument("action", choices=("check", "repair"),
                        help="check: report the journal's state (exit 2 when it needs a repair); "
                             "repair: copy it aside, then keep every readable record")
    parser.add_argument("study", help="a study name (its journal in --studies-dir) or the path of a journal file")
    parser.add_argument("--force", action="store_true",
                        help="repair: also drop unreadable lines that may have created a trial (renumbers later trials)")
    parser.add_argument("--studies-dir", type=Path, default=DEFAULT_STUDIES_DIR,
                        help=f"where the studies are (default: {DEFAULT_STUDIES_DIR})")
    args = parser.parse_args(argv)
    configure_logging()
    path = journal_path(args.study, args.studies_dir)
    if args.action == "check":
        check = check_journal(path)
        if check.corrupt_line is not None:
            raise UserError(check.describe())
        print(check.describe())
        return 0
    done = repair_journal(path, force=args.force)
    print(f"{path}: kept {done.kept} records, recovered {done.recovered} glued behind a torn one, dropped "
          f"{done.dropped} unreadable lines and a torn tail of {done.torn_tail} bytes; the original is in {done.backup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
