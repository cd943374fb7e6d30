"""``pcvr report``'s driver: run every cell not yet cached, in worker processes, with a progress bar.

Each cell runs in a worker process (``spawn``: a fresh interpreter, no state shared with
this one) whose output goes to the cell's log, so Flower's and Ray's lines never reach
the terminal. A finished cell's row is its cache entry (:mod:`pcvr.report.cells`):
an interrupted report, or one whose grid grew, runs only what is missing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pcvr.report.cells import CellTask, ReportLayout, cell_task, execute, prepare_base, read_row, seed_secrets
from pcvr.report.grid import CellKind, ReportGrid

__all__ = ["SweepOutcome", "run_cells", "default_jobs"]

KILL_GRACE_S = 5.0


def _worker_start(workers: Path) -> None:
    """In each worker: lead a process group of its own (Ray's processes join it), and say so.

    Ray ignores the terminal's Ctrl-C in its driver, so on an interrupt the report stops
    each worker's whole group itself (:func:`_stop_workers`).
    """
    os.setpgrp()
    workers.mkdir(parents=True, exist_ok=True)
    (workers / str(os.getpid())).touch()


def _stop_workers(workers: Path, *, kill: bool) -> None:
    """Forget this run's workers; with ``kill``, first stop each one's process group (they are alive)."""
    groups = [int(entry.name) for entry in workers.glob("*") if entry.name.isdigit()]
    if kill:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # Ray's driver may not finish on SIGTERM alone
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + KILL_GRACE_S
            while time.monotonic() < deadline and any(_alive(group) for group in groups):
                time.sleep(0.2)
    for entry in workers.glob("*"):
        entry.unlink(missing_ok=True)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def default_jobs() -> int:
    """One cell per two cores: a cell's run keeps about two busy (the platform and its clean rooms)."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass(frozen=True)
class SweepOutcome:
    """The rows of every cell, the control's row, and what this invocation ran."""

    rows: list[dict]
    control: dict | None
    reference: dict
    ran: list[str] = field(default_factory=list)  # keys of the cells computed now (the rest were cached)
    wall_s: float = 0.0


def _tasks(grid: ReportGrid, layout: ReportLayout) -> list[CellTask]:
    digests = {seed: seed_secrets(layout, seed=seed, advertisers=grid.world.advertisers) for seed in range(grid.seeds)}
    return [cell_task(grid, cell, out=layout.out, secrets_digest=digests[cell.seed]) for cell in grid.cells()]


def _line(bar, task: CellTask, error: BaseException | None, started: float) -> str:
    elapsed = time.monotonic() - started
    done = int(bar.completed)
    left = "" if bar.remaining == 0 else f", about {bar.time_remaining or 0:.0f} s left"
    state = "done" if error is None else f"FAILED ({error})"
    return f"[{done}/{int(bar.total)}] {task.cell.name}: {state}; {elapsed:.0f} s elapsed{left}"


def run_cells(grid: ReportGrid, *, out: Path, jobs: int, show_progress: bool = True) -> SweepOutcome:
    """Run the grid's missing cells with ``jobs`` worker processes; returns every cell's row.

    Raises:
        ValueError: ``jobs`` < 1.
        RuntimeError: a cell failed (the others still ran and are cached); names it and its log.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {jobs}")
    started = time.monotonic()
    layout = ReportLayout(Path(out))
    tasks = _tasks(grid, layout)
    reference = prepare_base(grid, layout)
    rows = {task.key: read_row(layout, task.key) for task in tasks}
    todo = [task for task in tasks if rows[task.key] is None]
    failures: list[str] = []
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
        TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"),
    )  # fmt: skip
    with Progress(*columns, console=console, disable=not show_progress, speed_estimate_period=3600) as progress:
        bar = progress.add_task("cached", total=len(tasks), completed=len(tasks) - len(todo))
        if todo:
            context = multiprocessing.get_context("spawn")
            workers = layout.out / "work" / "workers"
            _stop_workers(workers, kill=False)  # an earlier run's records: their processes are gone
            pool = ProcessPoolExecutor(
                max_workers=min(jobs, len(todo)), mp_context=context, initializer=_worker_start, initargs=(workers,)
            )
            with pool:
                pending: dict[Future, CellTask] = {pool.submit(execute, task): task for task in todo}
                try:
                    while pending:
                        running = [task.cell.name for future, task in pending.items() if future.running()]
                        progress.update(bar, description=" | ".join(running) or "starting")
                        done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                        for future in done:
                            task = pending.pop(future)
                            error = future.exception()
                            if error is None:
                                rows[task.key] = future.result()
                            else:
                                log = layout.artifacts(task.key) / "log.txt"
                                failures.append(f"cell {task.cell.name} failed: {error} (log: {log})")
                            progress.advance(bar)
                            if show_progress and not console.is_terminal:  # a log, not a live bar: one line per cell
                                console.print(_line(progress.tasks[0], task, error, started), soft_wrap=True)
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                    _stop_workers(workers, kill=True)
                    raise
            _stop_workers(workers, kill=False)
        progress.update(bar, description="done")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(todo)} cells failed; the rest are cached. First: {failures[0]}")
    control = next((rows[t.key] for t in tasks if t.cell.kind is CellKind.CONTROL), None)
    return SweepOutcome(
        rows=[rows[t.key] for t in tasks if t.cell.kind is CellKind.TRAIN],
        control=control,
        reference=reference,
        ran=[t.key for t in todo],
        wall_s=time.monotonic() - started,
    )
