"""Real processes on loopback: a SuperLink with TLS + SuperNode auth, SuperNodes that join or are refused.

Every process is started by the test (or by ``pcvr deploy local``), on 127.0.0.1 only, stopped by
its process group, and every wait is bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pcvr.cli import main
from pcvr.deploy.certs import CertLayout, make_certs
from pcvr.deploy.local import (
    LOCAL_HOSTS,
    LocalDeployment,
    deploy_local,
    register_command,
    superlink_command,
    supernode_command,
    write_connection,
)
from pcvr.deploy.processes import (
    DeployError,
    DeployLayout,
    Processes,
    environment,
    flwr_json,
    online_nodes,
    supernode_failure,
    wait_for_port,
)

from support import free_port_block, process_alive

ROUNDS = 2


def test_deploy_local_trains_three_clean_rooms_over_tls_with_node_auth(work_dir, tmp_path, capsys):
    deployment = LocalDeployment(
        work_dir=work_dir,
        run_dir=tmp_path / "run",
        clean_rooms=3,
        port=free_port_block(3),
        run_config={"num-rounds": ROUNDS, "eval-every": ROUNDS, "batch-size": 2048},
    )
    result = deploy_local(deployment)
    layout = deployment.layout
    printed = capsys.readouterr().out
    assert "TLS + SuperNode auth" in printed and "3 clean rooms online" in printed

    assert [r["round"] for r in result["history"]] == list(range(1, ROUNDS + 1))
    assert all(r["clean_rooms"] == 3 for r in result["history"])  # every room's reply was accepted, every round
    assert result["rejected"] == 0
    assert 0.5 < result["final"]["auc"] < 1.0
    nodes = json.loads(layout.nodes_file.read_text())
    assert sorted(nodes) == ["0", "1", "2"] and len(set(nodes.values())) == 3
    # The platform trained with exactly the registered nodes, and said so round by round.
    assert result["config"]["clean-room-nodes"] == ",".join(f"{k}:{nodes[k]}" for k in sorted(nodes))
    round_lines = [line for line in printed.splitlines() if line.startswith("pcvr round ")]
    assert [line.split()[2] for line in round_lines] == [f"{r}/{ROUNDS}:" for r in range(1, ROUNDS + 1)], printed
    assert all("3/3 clean rooms" in line for line in round_lines) and "AUC" in round_lines[-1]

    superlink_log = layout.log_file("superlink").read_text()
    assert "Uvicorn running on https://" in superlink_log  # TLS on the one port
    assert layout.database.exists()
    for k in range(3):
        assert "Start `flwr-clientapp`" in layout.log_file(f"supernode_{k}").read_text()
    pids = [int(p.read_text()) for p in layout.logs.glob("*.pid")]
    assert len(pids) == 4 and not any(process_alive(pid) for pid in pids)  # every process it started is stopped


def test_deploy_local_refuses_a_used_run_dir_and_a_missing_clean_room(work_dir, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    assert main(["deploy", "local", "--work-dir", str(work_dir), "--run-dir", str(used)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pcvr: error: --run-dir {used}: exists and is not empty; give a new directory"
    ]
    assert main(["deploy", "local", "--work-dir", str(work_dir), "--run-dir", str(tmp_path / "new"), "--clean-rooms", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clean_room_3: no such clean-room directory" in err[0]
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink with TLS + node auth, keys 0-2 registered; yields what the tests need to start SuperNodes."""
    root = tmp_path_factory.mktemp("superlink")
    certs = CertLayout(root / "certs")
    make_certs(certs.root, hosts=LOCAL_HOSTS, clean_rooms=4)  # key 3 is made but never registered
    layout = DeployLayout(root / "run")
    port = free_port_block(8)
    env = environment(layout)
    write_connection(layout, address=f"127.0.0.1:{port}", root_certificates=certs.ca_cert)
    layout.database.parent.mkdir(parents=True)
    processes = Processes(layout, env)
    try:
        processes.start("superlink", superlink_command(certs=certs, database=layout.database, host="127.0.0.1", port=port))
        wait_for_port(processes, "superlink", port, timeout_s=180)
        node_ids = {
            k: int(flwr_json(register_command(certs.node_public_key(k)), env, what="register", timeout_s=120)["node-id"])
            for k in range(3)
        }
        yield {"certs": certs, "port": port, "env": env, "processes": processes, "node_ids": node_ids, "layout": layout}
    finally:
        processes.stop_all()


def _start_supernode(superlink, name: str, slot: int, *, key: int, tls: bool = True, auth: bool = True, root_ca=None) -> Path:
    """A SuperNode as `pcvr deploy local` starts one, or misconfigured on purpose."""
    certs = superlink["certs"]
    address, port = f"127.0.0.1:{superlink['port']}", superlink["port"] + 1 + slot
    if tls and auth and root_ca is None:
        directory = superlink["layout"].run_dir / name
        command = supernode_command(superlink=address, certs=certs, clean_room_id=key, clean_room_dir=directory, clientappio_port=port)
    else:
        command = ["flower-supernode", "--superlink", address]
        command += ["--root-certificates", str(root_ca or certs.ca_cert)] if tls else ["--insecure"]
        command += ["--auth-supernode-private-key", str(certs.node_private_key(key))] if auth else []
        command += ["--node-config", f"clean-room-id={key}", "--port", str(port)]
    superlink["processes"].start(name, command)
    return superlink["layout"].log_file(name)


def _wait_for_failure(log_file: Path, *, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failure = supernode_failure(log_file)
        if failure is not None:
            return failure
        time.sleep(1.0)
    raise AssertionError(f"{log_file}: no failure within {timeout_s:.0f} s:\n{log_file.read_text()[-2000:]}")


def test_supernodes_that_must_not_join_are_refused_and_never_sent_anything(superlink):
    owner = _start_supernode(superlink, "owner", 0, key=2)  # a registered node, online first
    deadline = time.monotonic() + 120
    while superlink["node_ids"][2] not in online_nodes(superlink["env"]):
        assert supernode_failure(owner) is None and time.monotonic() < deadline, owner.read_text()[-2000:]
        time.sleep(1.0)

    other = CertLayout(superlink["layout"].run_dir / "other-ca")
    make_certs(other.root, hosts=LOCAL_HOSTS, clean_rooms=0)
    cases = {
        # name: (how it is started, what the refusal must say)
        "no_tls": (dict(key=0, tls=False, auth=False), "one side uses TLS and the other does not"),
        "insecure_with_key": (dict(key=0, tls=False), "node authentication needs TLS"),
        "other_ca": (dict(key=1, root_ca=other.ca_cert), "not signed by the CA this node trusts"),
        "unregistered_key": (dict(key=3), "refused this node's key"),
        "key_in_use": (dict(key=2), "refused this node's key"),
    }
    logs = {name: _start_supernode(superlink, name, slot, **how) for slot, (name, (how, _)) in enumerate(cases.items(), start=1)}
    for name, (_, expected) in cases.items():
        failure = _wait_for_failure(logs[name])
        assert expected in failure, (name, failure)
    online = online_nodes(superlink["env"])
    assert online == {superlink["node_ids"][2]}  # only the owner; 0 and 1 stay registered, never online
    for name, log_file in logs.items():
        text = log_file.read_text()
        assert "Start `flwr-clientapp`" not in text and "Receiving" not in text, name  # never sent a message
    assert supernode_failure(owner) is None  # the owner is not disturbed by the impostor


def test_wait_online_names_the_room_that_cannot_join(superlink, tmp_path):
    """``pcvr deploy local``'s wait says which clean room is stuck and why, instead of hanging."""
    from pcvr.deploy.local import _wait_online

    log_file = _start_supernode(superlink, "supernode_7", 7, key=0, tls=False, auth=False)
    started = time.monotonic()
    with pytest.raises(DeployError, match=r"clean room 7 cannot join: .*--insecure against a TLS SuperLink"):
        _wait_online(superlink["processes"], superlink["env"], {7: superlink["node_ids"][0]}, timeout_s=150)
    assert time.monotonic() - started < 150 and log_file.exists()
