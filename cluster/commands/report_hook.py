"""The HTML report of a run folder (``disco.loadgen.html_report``) from the CLI.

- ``disco load`` and ``disco demo`` end by writing ``DIR/report.html`` (and one per sub-run: a
  sweep's points, a demo's policies), whatever else they wrote: :func:`attach` wraps the
  command's ``run``, so the command itself needs no report code.
- ``disco load --report DIR`` (re)builds the reports of a finished folder and sends nothing.

A report that cannot be written is a warning, never a failed run.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

from disco.cluster.errors import CliError

Run = Callable[[argparse.Namespace], int]


def attach(p: argparse.ArgumentParser, run: Run, *, rebuild_flag: bool = False) -> None:
    """Set ``run`` (wrapped: the report is written after it) as ``p``'s command; with
    ``rebuild_flag``, also add ``--report DIR``."""
    if rebuild_flag:
        p.add_argument("--report", metavar="DIR",
                       help="(re)build DIR/report.html, one self-contained page with the run's "
                       "tables, plots, configuration and links, from a finished run folder "
                       "(and its sub-runs'); sends nothing")  # fmt: skip
    p.set_defaults(run=with_report(run))


def with_report(run: Run) -> Run:
    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        if getattr(args, "report", None) is not None:
            return rebuild(args.report, _tag(args))
        if getattr(args, "out", None) is None:
            raise CliError("--out is required (or --report DIR to rebuild a finished run's report)")
        rc = run(args)
        write(args.out, _tag(args))
        return rc

    return wrapped


def write(out_dir: str | Path, tag: str = "report") -> list[Path]:
    """Every report under ``out_dir`` (nothing when it holds no finished run); never raises."""
    from disco.loadgen.html_report import write_reports

    try:
        paths = write_reports(out_dir)
    except Exception as e:  # noqa: BLE001 - a report is not worth failing a finished run
        print(f"[{tag}] HTML report not written: {e}", flush=True)
        return []
    if paths:
        top = paths[-1]
        more = f" (+{len(paths) - 1} for its sub-runs)" if len(paths) > 1 else ""
        print(f"[{tag}] report: {top}{more}", flush=True)
    return paths


def rebuild(run_dir: str, tag: str = "report") -> int:
    from disco.loadgen.html_report import ReportError, write_reports

    d = Path(run_dir)
    if not d.is_dir():
        raise CliError(f"--report: {d} is not a folder")
    try:
        paths = write_reports(d)
    except ReportError as e:
        raise CliError(str(e)) from None
    if not paths:
        raise CliError(f"--report: {d} holds no finished run (no summary.json or sweep.json)")
    for p in paths:
        print(f"[{tag}] report: {p}")
    return 0


def _tag(args: argparse.Namespace) -> str:
    return str(getattr(args, "command", None) or "report")
