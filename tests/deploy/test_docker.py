"""docker/: no Docker engine runs here, so the compose files are checked against what runs for real.

Each service's command must be the one ``pcvr deploy local`` builds (same builder, container
paths), every flag must be one that flwr 1.41's binaries (or pcvr's CLI) accept, every path a
command uses must be mounted into that container, and every file mounted read-only must be one
that the per-party commands (``pcvr prepare``, ``pcvr certs``) produce.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from pcvr.cli import _parser
from pcvr.deploy.certs import CertLayout, make_certs
from pcvr.deploy.local import superexec_command, superlink_command, supernode_command
from pcvr.protocols.layout import PlatformDir

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE_FILES = ("compose.yml", "platform/compose.yml", "clean-room/compose.yml")
CONTAINER_CERTS = CertLayout(Path("/certs"))
STATE = Path("/clean-room-state")  # where a clean room whose directory is read-only writes
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def _substitute(text: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env[m.group(1)], text)


def _services(name: str, env: dict[str, str]) -> dict[str, dict]:
    return yaml.safe_load(_substitute((DOCKER / name).read_text(), env))["services"]


@pytest.fixture(scope="module")
def env(work_dir) -> dict[str, str]:
    """The variables the compose files need, pointing at what the per-party commands wrote."""
    make_certs(work_dir / "certs", hosts=("superlink", "127.0.0.1", "localhost"), clean_rooms=3)
    return {
        "PCVR_WORK": str(work_dir),
        "PCVR_UID": "1000",
        "SUPERLINK": "platform.example:8000",
        "CLEAN_ROOM_ID": "1",
        "PCVR_ROOM": str(work_dir / "clean_room_1"),
        "PCVR_CA": str(work_dir / "certs" / "ca.pem"),
        "PCVR_KEY": str(work_dir / "certs" / "clean_room_1" / "supernode.key"),
        "PCVR_ROOM_STATE": str(work_dir / "deployments" / "clean_room_1_state"),
    }


@cache
def _help(*command: str) -> str:
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def _binary_help(service: dict) -> tuple[str, str]:
    """(binary, its --help) for a service: its entry point, or pcvr's own CLI (the image's ENTRYPOINT)."""
    entrypoint = service.get("entrypoint", ["pcvr"])
    if entrypoint == ["pcvr"]:
        words = [w for w in service["command"] if not w.startswith("-")][:2]  # e.g. deploy register
        return "pcvr", _help(sys.executable, "-m", "pcvr.cli", *words)
    binary = entrypoint[0]
    return binary, _help(str(Path(sys.executable).parent / binary))


def _mounts(service: dict) -> list[tuple[Path, Path, bool]]:
    out = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out.append((Path(source), Path(target), mode == ["ro"]))
    return out


def _inside(path: Path, mounts: list[tuple[Path, Path, bool]]) -> bool:
    return any(path == target or target in path.parents for _, target, _ in mounts)


def test_every_flag_is_one_the_binary_accepts(env):
    checked = 0
    for name in COMPOSE_FILES:
        for service_name, service in _services(name, env).items():
            binary, help_text = _binary_help(service)
            assert "usage:" in help_text, (binary, help_text[-500:])
            for word in service["command"]:
                if word.startswith("--"):
                    assert re.search(rf"{re.escape(word)}\b", help_text), f"{name}:{service_name}: {binary} has no {word}"
                    checked += 1
    assert checked > 50
    _, superlink_help = _binary_help({"entrypoint": ["flower-superlink"], "command": []})
    assert not re.search(r"--clientappio-api-address\b", superlink_help)  # control: a flag flwr 1.41 dropped is caught


def test_commands_are_the_ones_pcvr_deploy_local_builds(env):
    one_host = {**_services("compose.yml", env), **_services("platform/compose.yml", env)}
    assert one_host["superlink"]["command"] == superlink_command(
        certs=CONTAINER_CERTS, database=Path("/state/state.db"), host="0.0.0.0", port=8000, isolation="process"
    )[1:]
    assert one_host["serverapp"]["command"] == superexec_command(
        runtime_api="superlink:8000", root_certificates=CONTAINER_CERTS.ca_cert
    )[1:]
    for k in range(3):
        assert one_host[f"supernode-{k}"]["command"] == supernode_command(
            superlink="superlink:8000", certs=CONTAINER_CERTS, clean_room_id=k, clean_room_dir=Path("/clean-room"),
            clientappio_port=9094, host="0.0.0.0", isolation="process", clean_room_state_dir=STATE,
        )[1:]
        assert one_host[f"clientapp-{k}"]["command"] == superexec_command(
            runtime_api=f"supernode-{k}:9094", root_certificates=None
        )[1:]
    clean_room = _services("clean-room/compose.yml", env)
    assert clean_room["supernode"]["command"] == supernode_command(
        superlink=env["SUPERLINK"], certs=CONTAINER_CERTS, clean_room_id=1, clean_room_dir=Path("/clean-room"),
        clientappio_port=9094, host="0.0.0.0", isolation="process", clean_room_state_dir=STATE,
    )[1:]
    assert clean_room["clientapp"]["command"] == superexec_command(runtime_api="supernode:9094", root_certificates=None)[1:]
    for step in ("register", "train", "resume"):  # pcvr's own CLI parses the one-shot steps as written
        args = _parser().parse_args(one_host[step]["command"])
        assert args.superlink == "superlink:8000" and args.root_certificates == CONTAINER_CERTS.ca_cert
    # resuming takes exactly the interrupted run's options
    assert one_host["resume"]["command"] == one_host["train"]["command"] + ["--resume"]
    assert one_host["resume"]["volumes"] == one_host["train"]["volumes"]


def test_every_path_a_command_uses_is_mounted_and_every_read_only_file_exists(env, work_dir):
    state = Path(env["PCVR_WORK"]) / "deployments"  # what the containers write: made at run time
    for name in COMPOSE_FILES:
        for service_name, service in _services(name, env).items():
            mounts = _mounts(service)
            where = f"{name}:{service_name}"
            for source, _, read_only in mounts:
                if read_only or state not in source.parents:
                    assert source.exists(), f"{where}: mounts {source}, which pcvr prepare / pcvr certs did not make"
            command = service["command"]
            seen_by_serverapp = {command[i + 1] for i, w in enumerate(command) if w == "--platform-dir"}  # checked below
            for word in [w for w in command if w.startswith("/") and w not in seen_by_serverapp]:
                path = Path(word)
                assert _inside(path, mounts) or _inside(path.parent, mounts), f"{where}: {path} is not mounted"
            if service_name == "supernode" or service_name.startswith("supernode-"):
                # the node config names the clean room's directory for the ClientApp, which runs in the
                # paired executor: mounted there, not in the SuperNode
                executor = _mounts(_services(name, env)[service_name.replace("supernode", "clientapp")])
                for directory in re.findall(r'clean-room-dir="([^"]+)"', " ".join(service["command"])):
                    assert _inside(Path(directory), executor), f"{where}: {directory} is not mounted in its executor"
                    assert not _inside(Path(directory), mounts), f"{where}: the SuperNode needs no clean-room data"
                    # the clean room's data is read-only to its ClientApp; what it records goes to its state dir
                    assert any(target == Path(directory) and ro for _, target, ro in executor), f"{where}: {directory} is writable"
                (state_dir,) = re.findall(r'clean-room-state-dir="([^"]+)"', " ".join(service["command"]))
                assert any(target == Path(state_dir) and not ro for _, target, ro in executor), f"{where}: no writable {state_dir}"
                assert service.get("restart") == "on-failure", f"{where}: a killed SuperNode must come back"
    serverapp = _mounts(_services("platform/compose.yml", env)["serverapp"])
    train = _services("platform/compose.yml", env)["train"]["command"]
    platform = PlatformDir(Path(train[train.index("--platform-dir") + 1]))
    for needed in (platform.backbone / "backbone.pt", platform.oracle_holdout):  # what the ServerApp reads
        assert _inside(needed, serverapp) or _inside(needed.parent, serverapp), needed


def test_every_container_runs_with_the_environment_pcvr_deploy_local_sets(env, tmp_path):
    from pcvr.deploy.processes import SUPEREXEC_POLL_ENV, DeployLayout, environment

    local = environment(DeployLayout(tmp_path))
    for name in COMPOSE_FILES:
        for service_name, service in _services(name, env).items():
            for key in ("FLWR_TELEMETRY_ENABLED", SUPEREXEC_POLL_ENV):
                assert service["environment"][key] == local[key], f"{name}:{service_name}: {key}"


def test_the_clean_room_host_mounts_only_its_own_key_and_directory(env):
    services = _services("clean-room/compose.yml", env)
    sources = {source for service in services.values() for source, _, _ in _mounts(service)}
    assert sources == {Path(env["PCVR_CA"]), Path(env["PCVR_KEY"]), Path(env["PCVR_ROOM"]), Path(env["PCVR_ROOM_STATE"])}
    assert not any("superlink.key" in str(s) or "ca.key" in str(s) for s in sources)
