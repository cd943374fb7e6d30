"""``pcvr deploy local``: every party as a real process on one machine, over TLS with SuperNode auth.

What it runs is what a deployment on several hosts runs (``docker/`` runs the
same commands in containers), each command built once here:

1. ``pcvr certs`` material (made if missing): the CA, the SuperLink's certificate,
   one SECP384R1 key per clean room;
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth`` (state in a
   database file, no runtime dependency installation);
3. ``flwr supernode register`` of each clean room's public key — the node ids
   Flower returns are the only nodes the platform trains with;
4. one ``flower-supernode`` per clean room, with its own node config
   (``clean-room-id``, ``clean-room-dir``) and its private key;
5. ``flwr run --stream`` of a config-only Flower app: the FAB carries the run
   config and names the apps, no code, so every party runs the pcvr installed on
   its own side, never code shipped to it by another;

then it prints the platform's lines as they stream, the final table, and stops
every process it started — also on Ctrl-C or SIGTERM. Each process's output
stays in ``<run-dir>/logs/``.

``insecure=True`` runs without TLS and without node authentication, which lets
any process that reaches the port join as a clean room and be sent the weights;
it exists for debugging on a closed machine only, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from pcvr.deploy.certs import CertLayout, make_certs
from pcvr.deploy.processes import (
    CONNECTION,
    DeployError,
    DeployLayout,
    Processes,
    Supervisor,
    environment,
    flwr_json,
    last_line,
    online_nodes,
    stop_group,
    supernode_failure,
    wait_for_port,
)
from pcvr.platform.federation import CHECKPOINT_FILE, interrupted_run
from pcvr.protocols.layout import RESULT_FILE, SimulationDir
from pcvr.protocols.run_config import RunConfig

__all__ = [
    "DeployError",
    "DeployLayout",
    "LocalDeployment",
    "INSECURE_WARNING",
    "superlink_command",
    "supernode_command",
    "superexec_command",
    "register_command",
    "run_command",
    "deploy_local",
    "register_clean_rooms",
    "register_keys",
    "end_interrupted_runs",
    "run_training",
    "supernode_failure",
]

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost")
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Anything that reaches port {port} "
    "can join as a clean room and is sent the model's weights, and every message crosses in the clear. "
    "Use it only to debug on a machine nobody else can reach."
)


@dataclass(frozen=True)
class LocalDeployment:
    """One ``pcvr deploy local`` invocation.

    Attributes:
        work_dir: a prepared work directory (``pcvr prepare``,
            :class:`~pcvr.protocols.layout.SimulationDir`): the platform's directory and one
            clean-room directory per clean room.
        run_dir: a new directory for this deployment's state, logs and results.
        clean_rooms: how many clean rooms to start (``clean_room_0`` … ``clean_room_{N-1}``).
        certs_dir: where the certificates and keys are (made there when missing).
        port: the SuperLink's one port (Fleet, Control and Runtime APIs); SuperNodes take
            the next ``clean_rooms`` ports for their ClientApp I/O.
        insecure: no TLS, no node authentication (see :data:`INSECURE_WARNING`).
        run_config: run-config values (kebab-case keys of :class:`RunConfig`) for the training.
        startup_timeout_s: how long each process may take to come up.
        resume: continue the run interrupted in ``run_dir`` (:func:`deploy_local`).
    """

    work_dir: Path
    run_dir: Path
    clean_rooms: int = 3
    certs_dir: Path | None = None
    port: int = 8000
    insecure: bool = False
    run_config: Mapping[str, object] = field(default_factory=dict)
    startup_timeout_s: float = 180.0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.clean_rooms < 1:
            raise ValueError(f"--clean-rooms must be >= 1; got {self.clean_rooms}")
        if not 1024 <= self.port <= 65535 - self.clean_rooms:
            raise ValueError(f"--port must leave room for {self.clean_rooms} more ports below 65536; got {self.port}")

    @property
    def layout(self) -> DeployLayout:
        return DeployLayout(Path(self.run_dir).resolve())

    @property
    def work(self) -> SimulationDir:
        return SimulationDir(Path(self.work_dir).resolve())

    @property
    def certs(self) -> CertLayout:
        return CertLayout(Path(self.certs_dir or self.work.certs).resolve())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def clean_room_dir(self, clean_room_id: int) -> Path:
        return Path(self.work.clean_room(clean_room_id).root)


def superlink_command(
    *, certs: CertLayout | None, database: Path, host: str, port: int, isolation: str | None = None
) -> list[str]:
    """The platform's SuperLink: TLS + node auth unless ``certs`` is None (insecure).

    ``isolation="process"`` is for containers: the ServerApp then runs in a separate
    executor (:func:`superexec_command`) instead of a child process.
    """
    command = ["flower-superlink"]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.superlink_cert),
            "--ssl-keyfile", str(certs.superlink_key),
            "--enable-supernode-auth",
        ]
    command += ["--disable-runtime-dependency-installation", "--database", str(database), "--host", host, "--port", str(port)]
    return command + (["--isolation", isolation] if isolation else [])


def supernode_command(
    *,
    superlink: str,
    certs: CertLayout | None,
    clean_room_id: int,
    clean_room_dir: Path,
    clientappio_port: int,
    host: str | None = None,
    isolation: str | None = None,
    clean_room_state_dir: Path | None = None,
) -> list[str]:
    """Clean room ``clean_room_id``'s SuperNode, with its node config and (unless insecure) its key.

    ``host``/``isolation="process"`` are for containers, where the ClientApp runs in the
    clean room's own executor (:func:`superexec_command`) reaching this port.
    ``clean_room_state_dir`` is where the clean room writes its release log and accountant
    when its directory is mounted read-only.
    """
    command = ["flower-supernode", "--superlink", superlink]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates", str(certs.ca_cert),
            "--auth-supernode-private-key", str(certs.node_private_key(clean_room_id)),
        ]
    node_config = f'clean-room-id={clean_room_id} clean-room-dir="{clean_room_dir}"'
    if clean_room_state_dir is not None:
        node_config += f' clean-room-state-dir="{clean_room_state_dir}"'
    command += ["--node-config", node_config, "--port", str(clientappio_port)]
    command += ["--host", host] if host else []
    return command + (["--isolation", isolation] if isolation else [])


def superexec_command(*, runtime_api: str, root_certificates: Path | None) -> list[str]:
    """An app executor: what the SuperLink (ServerApp) or a SuperNode (ClientApp) starts as its child in
    subprocess isolation, and what runs in its own container in process isolation. A SuperNode's
    runtime API is plain HTTP on the clean room's own side (``root_certificates=None``)."""
    command = ["flower-superexec", "--runtime-api-address", runtime_api]
    return command + (["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)])


def register_command(public_key: Path, *, connection: str = CONNECTION) -> list[str]:
    """The platform registers one clean room's public key; Flower answers with its node id."""
    return ["flwr", "supernode", "register", str(public_key), connection, "--format", "json"]


def run_command(app_dir: Path, *, connection: str = CONNECTION, federation_config: str | None = None) -> list[str]:
    """``flwr run --stream``; ``federation_config`` ("key=value ...") configures a simulation SuperLink's engine."""
    extra = [] if federation_config is None else ["--federation-config", federation_config]
    return ["flwr", "run", str(app_dir), connection, "--stream", *extra]


def write_connection(layout: DeployLayout, *, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml``: the one SuperLink connection the ``flwr`` commands use (None: insecure)."""
    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    (layout.flwr_home / "config.toml").write_text(text)


def write_app(layout: DeployLayout, run_config: Mapping[str, object]) -> None:
    """A Flower app directory with no code: it names pcvr's apps and carries the run config."""
    from pcvr import __version__

    layout.app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "pcvr-deployment", "version": __version__, "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "pcvr",
                    "components": {"serverapp": "pcvr.platform.app:app", "clientapp": "pcvr.clean_room.app:app"},
                    "config": dict(run_config),
                }
            }
        },
    }
    (layout.app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


def _wait_online(
    processes: Processes, env: Mapping[str, str], node_ids: Mapping[int, int], *, timeout_s: float
) -> None:
    """Wait until every registered clean room's SuperNode is online; name the first that cannot be."""
    deadline = time.monotonic() + timeout_s
    offline = dict(node_ids)
    while True:
        for k in sorted(offline):
            log_file = processes.layout.log_file(f"supernode_{k}")
            failure = supernode_failure(log_file)
            if failure is not None:
                raise DeployError(f"clean room {k} cannot join: {failure} (log: {log_file})")
            processes.check_alive(f"supernode_{k}")
        online = online_nodes(env)
        offline = {k: n for k, n in offline.items() if n not in online}
        if not offline:
            return
        if time.monotonic() > deadline:
            k = min(offline)
            log_file = processes.layout.log_file(f"supernode_{k}")
            raise DeployError(
                f"clean room {k} did not come online within {timeout_s:.0f} s; its SuperNode says: "
                f"{last_line(log_file)} (log: {log_file})"
            )
        time.sleep(2.0)


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM ends a deployment the way Ctrl-C does: through the ``finally`` that stops the processes."""

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(deployment: LocalDeployment) -> None:
    layout = deployment.layout
    if deployment.resume:
        for needed in (layout.app_dir / "pyproject.toml", layout.database, layout.training_dir / CHECKPOINT_FILE):
            if not needed.exists():
                raise FileNotFoundError(f"--resume: {needed} does not exist; {layout.run_dir} holds no run to resume")
    elif layout.run_dir.exists() and any(layout.run_dir.iterdir()):
        raise ValueError(f"--run-dir {layout.run_dir}: exists and is not empty; give a new directory")
    for k in range(deployment.clean_rooms):
        if not deployment.clean_room_dir(k).is_dir():
            raise FileNotFoundError(
                f"{deployment.clean_room_dir(k)}: no such clean-room directory (run `pcvr prepare` first, "
                f"or give --clean-rooms no larger than the prepared count)"
            )
    if not deployment.insecure:
        make_certs(deployment.certs.root, hosts=LOCAL_HOSTS, clean_rooms=deployment.clean_rooms)


def _run_config(deployment: LocalDeployment) -> RunConfig:
    """The training's run config: the options given, or, with ``resume``, the interrupted run's own plus ``resume-run``."""
    layout = deployment.layout
    given = {
        **deployment.run_config,
        "platform-dir": str(deployment.work.platform.root),
        "run-dir": str(layout.training_dir),
        "clean-rooms": deployment.clean_rooms,
    }
    if not deployment.resume:
        return RunConfig.from_run_config(given)
    recorded = tomllib.loads((layout.app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if int(recorded["clean-rooms"]) != deployment.clean_rooms:
        raise ValueError(f"--resume: the run in {layout.run_dir} has {recorded['clean-rooms']} clean rooms; give --clean-rooms {recorded['clean-rooms']}")
    return RunConfig.from_run_config({**recorded, "resume-run": interrupted_run(layout.training_dir)})


def _stop_leftovers(layout: DeployLayout) -> None:
    """Stop what an interrupted deployment in ``layout`` left running (by its pid files; Flower's own commands only)."""
    for pid_file in layout.logs.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (ValueError, OSError):
            continue
        if any(Path(part.decode(errors="replace")).name.startswith(("flower-", "flwr")) for part in command[:2]):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_sessions_lapsed(env: Mapping[str, str], node_ids: Mapping[int, int], *, timeout_s: float, out) -> None:
    """A SuperLink that died leaves its nodes online in its database until their heartbeat lapses (2 × 30 s);
    a SuperNode started before that is refused as a second user of its key."""
    deadline = time.monotonic() + timeout_s
    said = False
    while set(node_ids.values()) & online_nodes(env):
        if time.monotonic() > deadline:
            raise DeployError(f"the clean rooms' sessions from before the interruption did not lapse within {timeout_s:.0f} s")
        if not said:
            out("waiting for the clean rooms' sessions from before the interruption to lapse (at most 60 s)")
            said = True
        time.sleep(5.0)


def end_interrupted_runs(env: Mapping[str, str], *, timeout_s: float = 60.0) -> None:
    """Stop the runs an interrupted platform left unfinished and let the SuperLink clean up after them.

    The SuperLink's database still holds the interrupted run as running, with its last
    instructions undelivered; ended, neither reaches a restarted SuperNode, and the
    listing shows only the resumed run. A stop can lose the race with the SuperLink
    marking the dead run failed on its own; either way the run ends finished, which is
    what is waited for.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        listing = flwr_json(["flwr", "ls", CONNECTION, "--format", "json"], env, what="listing the runs", timeout_s=60)
        unfinished = [run["run-id"] for run in listing.get("runs", []) if not str(run.get("status", "")).startswith("finished")]
        if not unfinished:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"the interrupted run {unfinished[0]} did not end within {timeout_s:.0f} s")
        for run_id in unfinished:
            try:
                flwr_json(["flwr", "stop", str(run_id), CONNECTION, "--format", "json"], env, what=f"stopping run {run_id}", timeout_s=60)
            except DeployError:
                pass  # finished meanwhile, or not yet stoppable: the next listing says
        time.sleep(1.0)


def deploy_local(deployment: LocalDeployment, *, out=print) -> dict:
    """Run the deployment to the end; returns the platform's ``result.json``.

    While the run goes on, a :class:`~pcvr.deploy.processes.Supervisor` starts again any
    clean room's SuperNode that dies; the SuperLink dying ends the deployment with a
    :class:`DeployError` that says how to resume. With ``deployment.resume`` it continues
    the run interrupted in ``deployment.run_dir`` from its checkpoint (same database, same
    registered nodes, the run's own settings).

    Raises:
        DeployError: a process failed to start, a node did not come online, or the run failed.
    """
    layout = deployment.layout
    _prepare(deployment)
    config = _run_config(deployment)
    certs = None if deployment.insecure else deployment.certs
    if certs is None:
        out(INSECURE_WARNING.format(port=deployment.port))
    if deployment.resume:
        _stop_leftovers(layout)
        out(f"resuming run {config.resume_run} from {layout.training_dir / CHECKPOINT_FILE}")
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    env = environment(layout)
    write_connection(layout, address=deployment.address, root_certificates=None if certs is None else certs.ca_cert)
    processes = Processes(layout, env)
    run: list[subprocess.Popen] = []  # the `flwr run` process, once started
    try:
        with _terminate_on_sigterm():
            processes.start(
                "superlink",
                superlink_command(certs=certs, database=layout.database, host="127.0.0.1", port=deployment.port),
            )
            wait_for_port(processes, "superlink", deployment.port, timeout_s=deployment.startup_timeout_s)
            out(f"superlink up on {deployment.address} ({'insecure' if certs is None else 'TLS + SuperNode auth'})")
            node_ids: dict[int, int] = {}
            if deployment.resume:
                end_interrupted_runs(env)
            if certs is not None and deployment.resume:
                node_ids = read_nodes(layout)  # registered in the database already
                _wait_sessions_lapsed(env, node_ids, timeout_s=deployment.startup_timeout_s, out=out)
            elif certs is not None:
                node_ids = register_clean_rooms(layout, env, certs, clean_rooms=deployment.clean_rooms)
            supernodes = {
                f"supernode_{k}": supernode_command(
                    superlink=deployment.address, certs=certs, clean_room_id=k,
                    clean_room_dir=deployment.clean_room_dir(k), clientappio_port=deployment.port + 1 + k,
                )
                for k in range(deployment.clean_rooms)
            }
            for name, command in supernodes.items():
                processes.start(name, command)
            if node_ids:
                _wait_online(processes, env, node_ids, timeout_s=deployment.startup_timeout_s)
            out(f"{deployment.clean_rooms} clean rooms online; training {config.num_rounds} rounds")
            if node_ids:  # the platform trains with exactly these nodes
                config = dataclasses.replace(config, clean_room_nodes=RunConfig.format_nodes(node_ids))
            supervisor = Supervisor(
                processes, supernodes=supernodes, node_ids={f"supernode_{k}": n for k, n in node_ids.items()},
                platform="superlink", on_platform_lost=lambda why: [stop_group(p, sig=signal.SIGKILL) for p in run], out=out,
            )
            try:
                with supervisor:
                    return run_training(layout, env, config.to_run_config(), out=out, on_start=run.append)
            except DeployError:
                superlink = processes.running["superlink"]
                if superlink.poll() is None:
                    raise
                raise DeployError(
                    f"the platform stopped during the run (its SuperLink exited with status {superlink.returncode}); "
                    "its checkpoint holds the last "
                    f"completed round: resume with `pcvr deploy local --resume --run-dir {layout.run_dir}`"
                ) from None
    finally:
        processes.stop_all()


def register_clean_rooms(layout: DeployLayout, env: Mapping[str, str], certs: CertLayout, *, clean_rooms: int) -> dict[int, int]:
    """Register clean rooms 0 … ``clean_rooms``-1's public keys from ``certs``; see :func:`register_keys`."""
    return register_keys(layout, env, [certs.node_public_key(k) for k in range(clean_rooms)])


def register_keys(layout: DeployLayout, env: Mapping[str, str], public_keys: Sequence[Path]) -> dict[int, int]:
    """Register each clean room's public key with the SuperLink; clean room (its place in the list) → node id.

    Written to ``nodes.json``: these are the only nodes that can come online.
    """
    node_ids = {}
    for k, public_key in enumerate(public_keys):
        if not Path(public_key).is_file():
            raise FileNotFoundError(f"{public_key}: no such public key file (clean room {k})")
        answer = flwr_json(
            register_command(Path(public_key)), env, what=f"registering clean room {k}'s key {public_key}", timeout_s=120
        )
        node_ids[k] = int(answer["node-id"])
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.nodes_file.write_text(json.dumps({str(k): n for k, n in node_ids.items()}, indent=2) + "\n")
    return node_ids


def read_nodes(layout: DeployLayout) -> dict[int, int]:
    """Clean room → node id as :func:`register_keys` wrote them; empty when nothing was registered here."""
    if not layout.nodes_file.exists():
        return {}
    try:
        return {int(k): int(n) for k, n in json.loads(layout.nodes_file.read_text()).items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"{layout.nodes_file}: not a node list written by `pcvr deploy register` ({exc})") from None


def run_training(
    layout: DeployLayout, env: Mapping[str, str], run_config: Mapping[str, object], *, out=print,
    federation_config: str | None = None, on_start: Callable[[subprocess.Popen], object] | None = None,
) -> dict:
    """Start the training on a running SuperLink with ``flwr run --stream``; the platform's ``result.json``.

    ``on_start`` gets the ``flwr run`` process as soon as it is started (to stop it from elsewhere).
    """
    run_config = RunConfig.from_run_config(run_config).anchored().to_run_config()  # Flower's processes run in layout.run_dir
    write_app(layout, run_config)
    _stream_run(layout, env, out=out, federation_config=federation_config, on_start=on_start)
    result_path = Path(str(run_config["run-dir"])) / RESULT_FILE
    if not result_path.exists():
        raise DeployError(
            f"the run ended without {result_path}; see {layout.log_file('flwr-run')} and the SuperLink's log"
        )
    return json.loads(result_path.read_text())


def _stream_run(
    layout: DeployLayout, env: Mapping[str, str], *, out, federation_config: str | None = None,
    on_start: Callable[[subprocess.Popen], object] | None = None,
) -> None:
    """``flwr run --stream``: every line into its log, pcvr's own lines to ``out`` as they come."""
    from pcvr.platform.federation import ROUND_LINE_PREFIX, RUN_FAILED_PREFIX

    layout.logs.mkdir(parents=True, exist_ok=True)
    with layout.log_file("flwr-run").open("w") as run_log:
        process = subprocess.Popen(
            run_command(layout.app_dir, federation_config=federation_config), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, cwd=layout.run_dir,
        )
        if on_start is not None:
            on_start(process)
        try:
            for line in process.stdout or ():
                run_log.write(line)
                run_log.flush()
                if ROUND_LINE_PREFIX in line or RUN_FAILED_PREFIX in line:
                    out(line[line.find("pcvr "):].rstrip())
            process.wait()
        finally:
            stop_group(process, sig=signal.SIGTERM)
    if process.returncode != 0:
        raise DeployError(f"flwr run exited with status {process.returncode}: {last_line(layout.log_file('flwr-run'))}")
