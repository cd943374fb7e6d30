"""Flower's simulation engine, run the supported way: a SuperLink of its own in simulation mode, and ``flwr run``.

flwr 1.41 deprecates ``flwr.simulation.run_simulation``; what it supports is ``flwr run``
against a SuperLink started with ``--simulation``, which runs the apps in a
``flwr-simulation`` process on its Ray backend. Each call here starts such a SuperLink
on a free loopback port (no TLS: nothing leaves the machine, and nothing but this
process's ``flwr run`` knows the port), runs one training with the config-only app that
``pcvr deploy`` uses (:func:`pcvr.deploy.local.write_app`: the installed pcvr's apps,
no code shipped), passes pcvr's per-round lines to ``out`` and stops the SuperLink.
Everything else Flower and Ray print — start-up banners, deprecation notices, Ray's
worker logs — goes to log files under the run's ``engine/logs/``.

Each simulated clean room finds its directory through the launcher: the clean-room
directories travel to the ClientApps in the environment variable
:data:`pcvr.protocols.layout.CLEAN_ROOM_DIRS_ENV` of the SuperLink (inherited by the simulation process),
set here on this machine — never in the run config, which is the platform's.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from pcvr.deploy.local import run_training, write_connection
from pcvr.deploy.processes import DeployLayout, Processes, environment, wait_for_port
from pcvr.protocols.layout import CLEAN_ROOM_DIRS_ENV

__all__ = ["simulation_superlink_command", "run_simulation_engine"]

_START_TIMEOUT_S = 120.0


def simulation_superlink_command(*, port: int, database: Path) -> list[str]:
    """A SuperLink in simulation mode on loopback: the apps run in its own ``flwr-simulation`` child."""
    return [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation", "--database", str(database), "--host", "127.0.0.1", "--port", str(port),
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_simulation_engine(
    run_config: Mapping[str, object],
    *,
    clean_room_dirs: Mapping[int, Path],
    engine_dir: Path,
    out: Callable[[str], None] | None = None,
    cpus_per_room: int = 1,
) -> dict:
    """Train once in Flower's simulation engine with one simulated SuperNode per clean room; the platform's result.

    ``run_config`` is the full run config (its ``run-dir`` gets ``result.json``);
    ``engine_dir`` gets the SuperLink's state, the app and every log.

    Raises:
        pcvr.deploy.local.DeployError: the SuperLink did not start, or the run ended without a result.
    """
    layout = DeployLayout(Path(engine_dir).resolve())
    env = environment(layout)
    env[CLEAN_ROOM_DIRS_ENV] = json.dumps({str(room): str(Path(d).resolve()) for room, d in clean_room_dirs.items()})
    env.setdefault("RAY_DEDUP_LOGS", "0")
    port = _free_port()
    engine = (
        f"num-supernodes={len(clean_room_dirs)} client-resources-num-cpus={cpus_per_room} client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={os.cpu_count() or 1} init-args-log-to-driver=false"
    )
    write_connection(layout, address=f"127.0.0.1:{port}", root_certificates=None)
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    processes = Processes(layout, env)
    try:
        processes.start("superlink", simulation_superlink_command(port=port, database=layout.database))
        wait_for_port(processes, "superlink", port, timeout_s=_START_TIMEOUT_S)
        return run_training(layout, env, run_config, out=out or (lambda line: None), federation_config=engine)
    finally:
        processes.stop_all()
