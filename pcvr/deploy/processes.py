"""The processes of a deployment: started in their own sessions, watched, restarted, stopped.

What ``pcvr deploy local`` (:mod:`pcvr.deploy.local`) and the supported simulation engine
(:mod:`pcvr.deploy.simulation`) share: where a deployment keeps its state and logs
(:class:`DeployLayout`), the environment every Flower command runs in, one process group
per started process, bounded waits, ``flwr ... --format json`` calls, what a SuperNode's
log says about why it cannot join, and the :class:`Supervisor` that brings a clean room's
SuperNode back when it dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CONNECTION",
    "DeployError",
    "DeployLayout",
    "Processes",
    "Supervisor",
    "environment",
    "flwr_json",
    "last_line",
    "online_nodes",
    "stop_group",
    "supernode_failure",
    "wait_for_port",
]

CONNECTION = "pcvr-local"  # the one SuperLink connection in a deployment's $FLWR_HOME/config.toml
_STOP_GRACE_S = 10.0
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"  # seconds (flwr 1.41's default: 1)


class DeployError(RuntimeError):
    """A deployment step that failed; the message names the step, the process and its log."""


@dataclass(frozen=True)
class DeployLayout:
    """Where a local deployment keeps its state, logs and results (one owner for these names)."""

    run_dir: Path

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    def log_file(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    @property
    def database(self) -> Path:
        return self.run_dir / "superlink" / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.run_dir / "app"

    @property
    def training_dir(self) -> Path:
        """The platform's run directory: checkpoint, ``result.json``, ``privacy_ledger.json``."""
        return self.run_dir / "training"

    @property
    def nodes_file(self) -> Path:
        return self.run_dir / "nodes.json"


def environment(layout: DeployLayout) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(layout.flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # An app executor looks for a message to run every second by default; each clean room's
    # ClientApp starts per message, so each round would wait for that poll on top of the
    # SuperNode's own (3 s when idle, fixed in flwr 1.41).
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Processes:
    """The processes a deployment started: each in its own session, stopped as a group."""

    def __init__(self, layout: DeployLayout, env: Mapping[str, str]) -> None:
        self.layout = layout
        self.env = dict(env)
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.layout.log_file(name).open("ab")
        try:
            process = subprocess.Popen(
                list(command), stdout=log_file, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                cwd=self.layout.run_dir,
            )
        finally:
            log_file.close()
        self.running[name] = process
        (self.layout.logs / f"{name}.pid").write_text(f"{process.pid}\n")
        return process

    def check_alive(self, name: str) -> None:
        process = self.running[name]
        if process.poll() is not None:
            raise DeployError(
                f"{name} exited with status {process.returncode}: {last_line(self.layout.log_file(name))} "
                f"(log: {self.layout.log_file(name)})"
            )

    def stop_all(self) -> None:
        """Stop every process, the last started first."""
        for name in reversed(list(self.running)):
            stop_group(self.running.pop(name), sig=signal.SIGTERM)


def stop_group(process: subprocess.Popen, *, sig: int) -> None:
    """Signal the process's whole group (SuperNodes and the SuperLink start children), then make sure."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children outlive a leader that exited on its own
    except ProcessLookupError:
        pass
    process.wait()


def last_line(path: Path) -> str:
    """The last line of ``path`` that says something (not blank, not only a box's border)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line.strip("│╭╮╰╯─ ")]
    return lines[-1][:300] if lines else "(empty log)"


def wait_for_port(processes: Processes, name: str, port: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes.check_alive(name)
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise DeployError(f"{name} did not listen on port {port} within {timeout_s:.0f} s (log: {processes.layout.log_file(name)})")


def flwr_json(command: Sequence[str], env: Mapping[str, str], *, what: str, timeout_s: float) -> dict:
    """Run one ``flwr ... --format json`` command; its JSON answer, or a DeployError saying why not."""
    try:
        done = subprocess.run(list(command), env=dict(env), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeployError(f"{what}: no answer within {timeout_s:.0f} s ({' '.join(command[:3])})") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or not answer.get("success", False):
        detail = answer.get("error-message") if isinstance(answer, dict) else None
        if not detail:
            output = (done.stderr.strip() or done.stdout.strip()).splitlines()
            detail = output[-1] if output else "no output"
        raise DeployError(f"{what} failed: {detail}")
    return answer


_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_RETRY = "Connection attempt failed"
_RETRIES_BEFORE_FAILING = 4
_EXPLAIN = {
    "2004": "the SuperLink refused this node's key: it is not registered, or a node with the same key is already online",
    "CERTIFICATE_VERIFY_FAILED": "the SuperLink's certificate is not signed by the CA this node trusts (--root-certificates)",
    "TLS is not enabled": "node authentication needs TLS: this node was started with --insecure",
}


def supernode_failure(log_file: Path) -> str | None:
    """Why a SuperNode cannot join, read off its log; None while nothing says it cannot.

    Flower ends a refused SuperNode with an exit code and its reason; a SuperNode that
    speaks plain HTTP to a TLS SuperLink (or TLS to a plain one) only retries, forever,
    so a few failed attempts in a row are taken as that.
    """
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    for i, line in enumerate(lines):
        match = _EXIT_CODE.search(line)
        if match:
            reason = " ".join(lines[i + 1 : i + 3])
            explained = next((why for key, why in _EXPLAIN.items() if key in reason), None)
            return f"Flower exit code {match.group(1)}: {reason}" + (f" — {explained}" if explained else "")
    if sum(_RETRY in line for line in lines) >= _RETRIES_BEFORE_FAILING:
        return (
            f"{_RETRIES_BEFORE_FAILING} connection attempts to the SuperLink failed: it is unreachable, or one side "
            "uses TLS and the other does not (--insecure against a TLS SuperLink)"
        )
    return None


def online_nodes(env: Mapping[str, str]) -> set[int]:
    listing = flwr_json(
        ["flwr", "supernode", "list", CONNECTION, "--format", "json"], env, what="listing the SuperNodes", timeout_s=60
    )
    return {int(n["node-id"]) for n in listing.get("nodes", []) if n.get("status") == "online"}




class Supervisor:
    """Watches a running deployment from a thread of its own.

    A clean room's SuperNode that exits is started again with the same command (its log
    goes on). Killed with -9, it comes back as the same node (its key says which), but the
    SuperLink refuses it until the dead one's heartbeat has lapsed (Flower: 2 × 30 s), so
    a refused restart is retried every ``retry_s`` until the node is online again. The
    SuperLink exiting is the platform's death: ``on_platform_lost`` is called once (it
    ends the run; the checkpoint holds the last completed round).

    Used as a context manager around the run; it stops watching before the processes are
    stopped, so nothing it stops is brought back.
    """

    def __init__(
        self,
        processes: Processes,
        *,
        supernodes: Mapping[str, Sequence[str]],
        node_ids: Mapping[str, int],
        platform: str,
        on_platform_lost: Callable[[str], None],
        out: Callable[[str], None],
        interval_s: float = 1.0,
        retry_s: float = 5.0,
    ) -> None:
        self.processes = processes
        self.supernodes = {name: list(command) for name, command in supernodes.items()}
        self.node_ids = dict(node_ids)
        self.platform = platform
        self.on_platform_lost = on_platform_lost
        self.out = out
        self.interval_s, self.retry_s = interval_s, retry_s
        self.restarts: dict[str, int] = {}  # name → times started again
        self.platform_lost: str | None = None
        self._returning: dict[str, float] = {}  # name → when to look again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pcvr-supervisor", daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            leader = self.processes.running.get(self.platform)
            if self.platform_lost is None and leader is not None and leader.poll() is not None:
                self.platform_lost = f"{self.platform} exited with status {leader.returncode}"
                self.out(f"the platform's {self.platform_lost}; the run stops at its last checkpoint")
                self.on_platform_lost(self.platform_lost)
                return
            now = time.monotonic()
            for name, command in self.supernodes.items():
                process = self.processes.running.get(name)
                if process is not None and process.poll() is None:
                    if name in self._returning and now >= self._returning[name]:
                        self._check_back(name, now)
                    continue
                if name not in self._returning:
                    status = None if process is None else process.returncode
                    self.out(f"{name} exited with status {status}; starting it again")
                elif now < self._returning[name]:
                    continue
                self.processes.start(name, command)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._returning[name] = now + self.retry_s

    def _check_back(self, name: str, now: float) -> None:
        node = self.node_ids.get(name)
        try:
            back = node is None or node in online_nodes(self.processes.env)
        except DeployError:
            back = False
        if back:
            del self._returning[name]
            self.out(f"{name} is back online" + ("" if node is None else f" (node {node})"))
        else:
            self._returning[name] = now + self.retry_s
