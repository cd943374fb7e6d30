"""How a simulated run's cost grows with the number of clean rooms, rows per room fixed.

For each count (default 1, 4, 16, 64, 256) a fresh process prepares a synthetic world
with that many advertisers (``--rows-per-room`` clicks each), then trains a few
rounds of the ε=3 setting in Flower's simulation engine. This process samples the
resident memory of that process and every process under it (the engine's workers
included) twice a second. Prints one JSON line: per count, preparation time, the
first round's and the median later round's wall time, and peak RSS.

    python benchmarks/scale.py [--counts 1 4 16 64 256] [--rows-per-room 4096] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * _PAGE
        except OSError:
            continue
        stack.extend(_children(pid))
    return total


def one_count(args: argparse.Namespace) -> None:
    """In the child process: prepare and train one count; print its figures as JSON."""
    import logging

    from pcvr.data.synth import WorldConfig
    from pcvr.simulate import SimulationSpec, prepare, run_setting

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rooms = args.one
    spec = SimulationSpec(
        work_dir=Path(args.work_dir),
        world=WorldConfig(
            rows=rooms * args.rows_per_room, advertisers=rooms, pretrain_rows=100_000, holdout_rows=20_000
        ),
        num_rounds=args.rounds,
        eval_every=args.rounds,
        batch_size=args.batch_size,
        min_batch_size=args.batch_size // 2,
        pretrain_epochs=1,
    )
    started = time.perf_counter()
    prepare(spec)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    result = run_setting(spec, name="scale", label_set=spec.private_label_set, correction=spec.correction)
    rounds = [entry["wall_s"] for entry in result["history"]]
    print(
        json.dumps(
            {
                "clean_rooms": rooms,
                "prepare_s": round(prepare_s, 1),
                "run_s": round(time.perf_counter() - started, 1),
                "first_round_s": round(rounds[0], 3),
                "round_s_median": round(statistics.median(rounds[1:] or rounds), 3),
                "served_every_round": all(entry["clean_rooms"] == rooms for entry in result["history"]),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--rows-per-room", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work-dir", default=None, help="(default: a temporary directory per count)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one is not None:
        one_count(args)
        return
    figures = []
    for count in args.counts:
        with tempfile.TemporaryDirectory(prefix="pcvr-scale-") as scratch:
            work = Path(args.work_dir or scratch) / f"rooms-{count}"
            command = [
                sys.executable, __file__, "--one", str(count), "--rows-per-room", str(args.rows_per_room),
                "--batch-size", str(args.batch_size), "--rounds", str(args.rounds), "--work-dir", str(work),
            ]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            peak = 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, tree_rss_bytes(child.pid))
                    done.wait(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out, _ = child.communicate()
            done.set()
            sampler.join()
            if child.returncode != 0:
                raise SystemExit(f"scale: {count} clean rooms failed (exit {child.returncode})")
            figures.append({**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": round(peak / 2**20)})
    print(json.dumps({"benchmark": "scale", "rows_per_room": args.rows_per_room, "rounds": args.rounds, "counts": figures}))


if __name__ == "__main__":
    main()
