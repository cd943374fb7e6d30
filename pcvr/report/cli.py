"""``pcvr report``'s options and handler (registered by :mod:`pcvr.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_report_command"]


def add_report_command(commands: argparse._SubParsersAction) -> None:
    """Add ``pcvr report`` to the ``pcvr`` command's sub-commands."""
    from pcvr.report.grid import SHIPPED_GRIDS
    from pcvr.report.runner import default_jobs

    report = commands.add_parser("report", help="sweep a grid of settings; write results, plots and one HTML page")
    report.add_argument(
        "--grid", default="default", help=f"a grid TOML file, or a shipped grid: {', '.join(SHIPPED_GRIDS)} (default: %(default)s)"
    )
    report.add_argument("--out", type=Path, default=Path("runs/report"), help="report folder; its cached cells are reused (default: %(default)s)")
    report.add_argument("--jobs", type=int, default=default_jobs(), help="cells run in parallel processes (default: %(default)s, half the cores)")
    report.add_argument("--screenshot", action="store_true", help="then open index.html in headless Chromium: check every image, save OUT/screenshot.png")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.add_argument(
        "--spec", type=Path, action="append", default=None,
        help="run on your own files instead of the synthetic world: one dataset spec per advertiser, repeated "
        "(the first one's [pretrain] pretrains the backbone); the grid's [world] is then unused",
    )
    report.set_defaults(func=_cmd_report)


def _on_user_data(grid, *, specs: list[Path], out: Path):
    """The grid on the user's specs: checked first (nothing written on a bad spec), then laid out as the world."""
    import dataclasses

    from pcvr.protocols.layout import SimulationDir
    from pcvr.report.cells import ReportLayout
    from pcvr.report.userdata import import_user_data, load_user_data

    data = load_user_data(specs)
    layout = ReportLayout(out)
    world = import_user_data(data, SimulationDir(layout.base).world, secret_file=layout.out / "secrets" / "holdout_split.key")
    return dataclasses.replace(grid, world=world, data_digest=data.digest, name=f"{grid.name} on your data")


def _cmd_report(args: argparse.Namespace) -> int:
    from pcvr.report.grid import load_grid
    from pcvr.report.page import headline
    from pcvr.report.report import make_report

    grid = load_grid(args.grid)  # every cell validated before anything runs
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
    if args.spec:
        grid = _on_user_data(grid, specs=args.spec, out=args.out)
    try:
        document = make_report(grid, out=args.out, jobs=args.jobs, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        raise RuntimeError(
            f"interrupted; the cells that finished are cached in {args.out / 'cells'}: the same command resumes"
        ) from None
    for name in document["plots"]:
        print(f"{name}: {headline(name, document)}")
    print(
        f"\nreport: {args.out / 'index.html'} ({document['cells_run']} cells run, {document['cells_cached']} reused, "
        f"{document['wall_s']:.0f} s; results.json, results.csv and the plots beside it)"
    )
    if args.screenshot:
        from pcvr.report.browser import check_page

        check = check_page(args.out / "index.html", screenshot=args.out / "screenshot.png")
        print(f"{check.text}; screenshot {args.out / 'screenshot.png'}")
        if not check.ok:
            raise RuntimeError(f"{args.out / 'index.html'}: {check.text}")
    return 0
