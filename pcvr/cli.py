"""The ``pcvr`` command.

    pcvr keys new --out FILE        a join secret (shared with the platform) or an RR secret (never leaves)
    pcvr platform pretrain | export, pcvr advertiser hand-off, pcvr clean-room join, pcvr train:
                                    one command per party, each writing only its own directory
    pcvr data synth --rows N --advertisers K --out DIR
    pcvr prepare [options]          world, backbone, hand-offs and joins, no training
    pcvr simulate [--json] [options]  all of the above, then every setting in Flower's simulation engine
    pcvr audit [--json] [options]     label-leakage attacks on what the platform received, scored on canaries
    pcvr certs --out DIR [--hosts H,...] [--clean-rooms N]  TLS CA + SuperLink certificate, SuperNode keys
    pcvr deploy local [options]     every party as a real process: SuperLink + SuperNodes, TLS + node auth
    pcvr plan --base-rate P --rows N [--epsilon E ...]  what each ε costs, before any budget is spent
    pcvr report [--grid G] [--out DIR] [--jobs N]  sweep a grid; results, plots and one HTML page

Bad input ends with one line, ``pcvr: error: …``, naming the file or the flag, and exit
status 2 (``--debug`` shows the traceback instead); a simulation in which a clean room
failed ends with one such line naming the room and the reason, and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
from pathlib import Path

from pcvr.advertiser.policy import ConsentPolicy
from pcvr.cli_parties import add_party_commands, add_training_arguments
from pcvr.data.schema import ConsentLevel
from pcvr.data.synth import WorldConfig, synthesize
from pcvr.protocols.codecs import Codec
from pcvr.protocols.label_dp import Correction
from pcvr.protocols.run_config import RunConfig

__all__ = ["main"]


def _add_world_arguments(parser: argparse.ArgumentParser, *, rows: int) -> None:
    parser.add_argument("--rows", type=int, default=rows, help="clean-room clicks in all (default: %(default)s)")
    parser.add_argument("--advertisers", type=int, default=3, help="clean-room advertisers (default: %(default)s)")
    parser.add_argument("--pretrain-rows", type=int, default=None, help="platform's own clicks (default: --rows)")
    parser.add_argument("--holdout-rows", type=int, default=None, help="held-out clicks (default: rows/4)")
    parser.add_argument("--base-rate", type=float, default=0.025, help="conversion rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the runs (default: %(default)s)")


def _world_config(args: argparse.Namespace) -> WorldConfig:
    return WorldConfig(
        seed=args.seed,
        rows=args.rows,
        advertisers=args.advertisers,
        pretrain_rows=args.pretrain_rows,
        holdout_rows=args.holdout_rows,
        base_rate=args.base_rate,
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_world_arguments(parser, rows=600_000)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/demo"), help="(default: %(default)s)")
    parser.add_argument(
        "--epsilon", type=float, default=None, help="label-DP ε of standard consent (default: the policy's standard ε)"
    )
    parser.add_argument("--policy", type=Path, default=None, help="consent policy TOML (default: the bundled one)")
    add_training_arguments(parser)


def _epsilon(args: argparse.Namespace, policy: ConsentPolicy) -> float:
    """``--epsilon``, or the policy's standard ε; a ``--policy`` file that says otherwise is an error."""
    standard = policy.epsilon_for(ConsentLevel.STANDARD)
    if args.epsilon is None:
        if standard is None or math.isinf(standard):
            raise ValueError(f"--policy {args.policy}: standard consent has no finite ε; give --epsilon")
        return standard
    if args.policy is not None and args.epsilon != standard:
        raise ValueError(
            f"--epsilon {args.epsilon:g} disagrees with --policy {args.policy} (standard = {standard}); give one or make them agree"
        )
    return args.epsilon


def _spec(args: argparse.Namespace):
    """The run the flags describe, every flag validated (before anything is prepared)."""
    from pcvr.simulate import SimulationSpec

    policy = ConsentPolicy.from_file(args.policy) if args.policy else ConsentPolicy.default()
    return SimulationSpec(
        work_dir=args.work_dir,
        world=_world_config(args),
        policy=policy,
        epsilon=_epsilon(args, policy),
        correction=Correction.parse(args.correction),
        num_rounds=args.num_rounds,
        batch_size=args.batch_size,
        min_batch_size=args.min_batch_size,
        learning_rate=args.learning_rate,
        eval_every=args.eval_every,
        seed=args.seed,
        codec=Codec.parse(args.codec),
        downstream_codec=Codec.parse(args.downstream_codec),
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_target_epsilon=args.dp_target_epsilon,
        dp_clip_norm=args.dp_clip_norm,
        local_steps=args.local_steps,
    )


def _cmd_synth(args: argparse.Namespace) -> None:
    summary = synthesize(args.out, _world_config(args))
    print(json.dumps({"out": str(args.out), "holdout": summary["holdout"], "clean_rooms": summary["clean_rooms"]}))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from pcvr.simulate import prepare

    spec = _spec(args)
    prepare(spec)
    print(f"prepared {spec.work_dir}: label sets {', '.join(spec.label_sets())}")


def _progress_printer():
    """One line per setting on stderr: rewritten each round on a terminal; elsewhere (logs, CI) its evaluated rounds."""
    from pcvr.platform.federation import ROUND_LINE_PREFIX

    live = sys.stderr.isatty()
    state = {"setting": None}

    def show(setting: str, line: str) -> None:
        text = f"{setting:<16} {line.removeprefix(ROUND_LINE_PREFIX).strip()}"
        if live:
            end = "\n" if state["setting"] not in (None, setting) else ""
            print(f"{end}\r\033[K{text}", end="", file=sys.stderr, flush=True)
        elif "AUC" in line:
            print(text, file=sys.stderr, flush=True)
        state["setting"] = setting

    return show


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pcvr.simulate import format_table, simulate

    spec = _spec(args)
    summary = simulate(spec, progress=None if args.json else _progress_printer())
    if sys.stderr.isatty() and not args.json:
        print(file=sys.stderr)  # end the live progress line
    if args.json:
        keys = ("results", "failures", "rounds", "wall_s", "bytes_up", "bytes_down", "codec", "downstream_codec", "parameters")
        print(json.dumps({k: summary[k] for k in keys}))
    else:
        print(format_table(summary))
        print(f"\nfull summary: {spec.layout.summary}")
    if summary["failures"]:
        print(f"pcvr: error: {summary['failures'][0]}", file=sys.stderr)
        return 1
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from pcvr.audit.harness import AuditSetting, control_setting, format_audit, run_audit

    spec = _spec(args)
    if spec.dp_target_epsilon:
        raise ValueError("pcvr audit takes DP-SGD as --dp-noise-multiplier (the σ it audits), not --dp-target-epsilon")
    for name in ("canaries", "canaries_per_batch", "control_canaries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    batch = spec.min_batch_size if args.audit_batch_size is None else args.audit_batch_size
    setting = AuditSetting(
        name=f"eps={spec.epsilon:g},b={batch},{spec.codec}" + (f",dp={spec.dp_noise_multiplier:g}" if spec.dp_noise_multiplier else ""),
        epsilon=spec.epsilon,
        batch_size=batch,
        canaries_per_room=args.canaries,
        rows_per_room=batch * max(1, math.ceil(args.canaries / args.canaries_per_batch)),
        correction=spec.correction,
        codec=spec.codec,
        dp_noise_multiplier=spec.dp_noise_multiplier,
    )
    report = run_audit(
        spec, settings=[setting], control=control_setting(canaries_per_room=args.control_canaries), seed=args.seed
    )
    (spec.work_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else format_audit(report))
    return 0 if report["passed"] else 1


def _cmd_certs(args: argparse.Namespace) -> None:
    from pcvr.deploy.certs import make_certs, parse_hosts

    report = make_certs(args.out, hosts=parse_hosts(args.hosts), clean_rooms=args.clean_rooms)
    for path in report.created:
        print(f"created {path}")
    for path in report.kept:
        print(f"kept    {path} (exists; delete it to replace it)")


def _parse_run_config(text: str) -> dict[str, object]:
    """``--run-config 'key=value key2="text"'`` (Flower's syntax: TOML values)."""
    import tomllib

    try:
        return tomllib.loads("\n".join(text.split())) if text.strip() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--run-config: {exc}") from None


_DEPLOY_TRAINING_OPTIONS = ("rounds", "eval_every", "label_set", "run_config")  # what a resumed run takes from itself
_DEFAULTS = {"clean_rooms": 3, "rounds": 10, "eval_every": 5, "label_set": "eps=3", "run_config": ""}


def _add_deploy_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options `pcvr deploy local` and `pcvr deploy run` share."""
    parser.add_argument("--clean-rooms", type=int, default=_DEFAULTS["clean_rooms"], help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=_DEFAULTS["rounds"], help="(default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=_DEFAULTS["eval_every"], help="(default: %(default)s)")
    parser.add_argument("--label-set", default=_DEFAULTS["label_set"], help="prepared label set to train on (default: %(default)s)")
    parser.add_argument(
        "--run-config", default=_DEFAULTS["run_config"], help="more run-config values, Flower's syntax: 'codec=\"q4\" batch-size=4096'"
    )


def _deploy_run_config(args: argparse.Namespace) -> dict[str, object]:
    return {"num-rounds": args.rounds, "eval-every": args.eval_every, "label-set": args.label_set, **_parse_run_config(args.run_config)}


def _cmd_deploy_local(args: argparse.Namespace) -> None:
    from datetime import datetime, timezone

    from pcvr.deploy.local import LocalDeployment, deploy_local

    if args.resume:
        if args.run_dir is None:
            raise ValueError("--resume needs --run-dir: the deployment whose run to continue")
        changed = [f"--{name.replace('_', '-')}" for name in _DEPLOY_TRAINING_OPTIONS if getattr(args, name) != _DEFAULTS[name]]
        if changed:
            raise ValueError(f"--resume continues the run with its own settings; drop {', '.join(changed)}")
    run_config = _deploy_run_config(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    deployment = LocalDeployment(
        work_dir=args.work_dir,
        run_dir=args.run_dir or args.work_dir / "deployments" / stamp,
        clean_rooms=args.clean_rooms,
        certs_dir=args.certs,
        port=args.port,
        insecure=args.insecure,
        run_config=run_config,
        resume=args.resume,
    )
    try:
        result = deploy_local(deployment)
    except KeyboardInterrupt:
        raise RuntimeError(f"interrupted; every process it started is stopped (logs: {deployment.layout.logs})") from None
    _print_deploy_result(result, label_set=str(result["config"]["label-set"]), run_dir=deployment.layout.run_dir)


def _print_deploy_result(result: dict, *, label_set: str, run_dir: Path) -> None:
    if result.get("failures"):
        raise RuntimeError(f"the run failed: {result['failures'][0]} (results and logs in {run_dir})")
    final = result["final"]
    print(
        f"\n{'setting':<22} {'AUC':>7} {'NE':>7} {'calibration':>12} {'bytes up/round':>15} {'bytes down/round':>17}\n"
        f"{label_set:<22} {final['auc']:>7.4f} {final['ne']:>7.4f} {final['calibration']:>12.3f}"
        f" {result['bytes_up_per_round']:>15,.0f} {result['bytes_down_per_round']:>17,.0f}\n"
        f"\n{result['config']['clean-rooms']} clean rooms as real processes, {result['config']['num-rounds']} rounds; "
        f"results and logs in {run_dir}"
    )


def _remote_layout(args: argparse.Namespace):
    """The layout and environment of `pcvr deploy register` / `run` against a SuperLink someone else started."""
    from pcvr.deploy.local import INSECURE_WARNING, DeployLayout, environment, write_connection

    if args.insecure == (args.root_certificates is not None):
        raise ValueError("give exactly one of --root-certificates (the platform CA's ca.pem) and --insecure")
    if args.root_certificates is not None and not args.root_certificates.is_file():
        raise FileNotFoundError(f"--root-certificates {args.root_certificates}: no such file")
    if args.insecure:
        print(INSECURE_WARNING.format(port=args.superlink.rpartition(":")[2]))
    layout = DeployLayout(args.run_dir.resolve())
    write_connection(layout, address=args.superlink, root_certificates=args.root_certificates)
    return layout, environment(layout)


def _cmd_deploy_register(args: argparse.Namespace) -> None:
    from pcvr.deploy.local import register_keys

    layout, env = _remote_layout(args)
    for k, node in register_keys(layout, env, args.public_keys).items():
        print(f"clean room {k}: node {node}")
    print(f"node ids in {layout.nodes_file}")


def _cmd_deploy_run(args: argparse.Namespace) -> None:
    from pcvr.deploy.local import end_interrupted_runs, read_nodes, run_training
    from pcvr.platform.federation import interrupted_run
    from pcvr.protocols.run_config import RunConfig

    layout, env = _remote_layout(args)
    results = layout.training_dir if args.results_dir is None else args.results_dir
    resume_run = interrupted_run(results) if args.resume else 0
    config = RunConfig.from_run_config(
        {
            **_deploy_run_config(args),
            "platform-dir": str(args.platform_dir),
            "run-dir": str(results),
            "clean-rooms": args.clean_rooms,
            "clean-room-nodes": RunConfig.format_nodes(read_nodes(layout)),  # those `deploy register` registered
            "resume-run": resume_run,
        }
    )
    if args.resume:
        print(f"resuming run {resume_run} from its checkpoint in {results}")
        end_interrupted_runs(env)
    _print_deploy_result(run_training(layout, env, config.to_run_config()), label_set=args.label_set, run_dir=layout.run_dir)


def _cmd_plan(args: argparse.Namespace) -> None:
    from pcvr.report.planner import format_plan, plan

    if not 0 < args.base_rate < 1:
        raise ValueError(f"--base-rate must be in (0, 1); got {args.base_rate}")
    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1; got {args.rows}")
    if not all(eps > 0 for eps in args.epsilon):
        raise ValueError(f"--epsilon values must be > 0 (or inf); got {args.epsilon}")
    for name in ("tolerance", "confidence"):
        if not 0 < getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in (0, 1); got {getattr(args, name)}")
    options = {"tolerance": args.tolerance, "confidence": args.confidence}
    table = plan(base_rate=args.base_rate, rows=args.rows, epsilons=args.epsilon, **options)
    if args.json:
        print(json.dumps({"base_rate": args.base_rate, "rows": args.rows, **options, "plan": [r.to_dict() for r in table]}))
    else:
        print(format_plan(table, base_rate=args.base_rate, rows=args.rows, **options))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"pcvr: error: {self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pcvr", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    add_party_commands(commands)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the synthetic world to Parquet")
    _add_world_arguments(synth, rows=600_000)
    synth.add_argument("--out", type=Path, required=True, help="new directory to write")
    synth.set_defaults(func=_cmd_synth)

    prepare = commands.add_parser("prepare", help="world, backbone, hand-offs and joins; no training")
    _add_run_arguments(prepare)
    prepare.set_defaults(func=_cmd_prepare)

    simulate = commands.add_parser("simulate", help="multi-party training in Flower's simulation engine")
    _add_run_arguments(simulate)
    simulate.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    simulate.set_defaults(func=_cmd_simulate)

    audit = commands.add_parser("audit", help="attack what the platform received; score on canaries")
    _add_run_arguments(audit)
    audit.add_argument("--canaries", type=int, default=100, help="canaries per clean room (default: %(default)s)")
    audit.add_argument("--canaries-per-batch", type=int, default=10, help="(default: %(default)s)")
    audit.add_argument(
        "--audit-batch-size", type=int, default=None, help="batch size audited (default: --min-batch-size, the worst case)"
    )
    audit.add_argument(
        "--control-canaries", type=int, default=64, help="canaries per clean room in the control (default: %(default)s)"
    )
    audit.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    audit.set_defaults(func=_cmd_audit)

    certs = commands.add_parser("certs", help="TLS certificates and SuperNode keys for a deployment")
    certs.add_argument("--out", type=Path, required=True, help="directory to write (existing files are kept)")
    certs.add_argument(
        "--hosts",
        default="",
        help="names and IPs the SuperLink is reached by, e.g. 127.0.0.1,localhost,superlink "
        "(makes the CA and the SuperLink certificate; omit on a clean room's host)",
    )
    certs.add_argument("--clean-rooms", type=int, default=0, help="SuperNode key pairs to make (default: %(default)s)")
    certs.set_defaults(func=_cmd_certs)

    deploy = commands.add_parser("deploy", help="run the parties as real processes").add_subparsers(
        dest="deploy_command", required=True
    )
    local = deploy.add_parser("local", help="SuperLink + one SuperNode per clean room on this machine, TLS + node auth")
    local.add_argument("--work-dir", type=Path, default=Path("runs/demo"), help="prepared by `pcvr prepare` (default: %(default)s)")
    local.add_argument("--run-dir", type=Path, default=None, help="new directory for state, logs, results (default: WORK/deployments/TIME)")
    local.add_argument("--certs", type=Path, default=None, help="certificates and keys, made if missing (default: WORK/certs)")
    local.add_argument("--port", type=int, default=8000, help="the SuperLink's port; SuperNodes use the next ones (default: %(default)s)")
    _add_deploy_training_arguments(local)
    local.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: anyone who reaches the port joins (debugging only)")
    local.add_argument(
        "--resume", action="store_true",
        help="continue the run interrupted in --run-dir from its last checkpoint, with that run's settings",
    )
    local.set_defaults(func=_cmd_deploy_local)

    def remote(name: str, help: str) -> argparse.ArgumentParser:
        sub = deploy.add_parser(name, help=help)
        sub.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
        sub.add_argument("--root-certificates", type=Path, default=None, help="the platform CA's ca.pem (from `pcvr certs`)")
        sub.add_argument("--run-dir", type=Path, required=True, help="where the flwr connection, node ids and logs go")
        sub.add_argument("--insecure", action="store_true", help="no TLS (debugging only)")
        return sub

    register = remote("register", "register clean rooms' SuperNode public keys with a running SuperLink")
    register.add_argument("public_keys", type=Path, nargs="+", help="supernode.pub of clean room 0, 1, …")
    register.set_defaults(func=_cmd_deploy_register)

    run = remote("run", "train on a running SuperLink whose clean rooms are online")
    run.add_argument("--platform-dir", type=Path, required=True, help="the platform's directory as the ServerApp sees it")
    run.add_argument("--results-dir", type=Path, default=None, help="where the ServerApp writes results, as it sees it (default: RUN/training)")
    _add_deploy_training_arguments(run)
    run.add_argument(
        "--resume", action="store_true",
        help="continue the run whose checkpoint is in the results dir (give the same options as the interrupted run)",
    )
    run.set_defaults(func=_cmd_deploy_run)

    from pcvr.report.planner import DEFAULT_CONFIDENCE, DEFAULT_EPSILONS, DEFAULT_TOLERANCE

    planner = commands.add_parser("plan", help="what each ε costs in calibration, before any budget is spent")
    planner.add_argument("--base-rate", type=float, required=True, help="clean conversion rate, e.g. 0.009")
    planner.add_argument("--rows", type=int, required=True, help="labelled rows the clean room trains on")
    planner.add_argument(
        "--epsilon", type=float, nargs="+", default=list(DEFAULT_EPSILONS), help="label-DP ε values, inf allowed (default: %(default)s)"
    )
    planner.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative calibration band (default: %(default)s)")
    planner.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="(default: %(default)s)")
    planner.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    planner.set_defaults(func=_cmd_plan)
    from pcvr.report.cli import add_report_command

    add_report_command(commands)
    return parser


# run-config keys whose flag has another name; every other key is its own flag
_FLAG_OF_KEY = {"num-rounds": "--rounds", "clean-rooms": "--advertisers"}
_RUN_CONFIG_KEY = re.compile(
    r"(?<![\w-])("
    + "|".join(sorted((re.escape(f.name.replace("_", "-")) for f in dataclasses.fields(RunConfig)), key=len, reverse=True))
    + r")(?![\w-])"
)


def _one_line(error: BaseException) -> str:
    """The error as one line, in the user's terms: the file it concerns, or the flags (not run-config keys)."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or type(error).__name__}"
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if text.startswith("run config: "):
        text = _RUN_CONFIG_KEY.sub(lambda m: _FLAG_OF_KEY.get(m[1], f"--{m[1]}"), text.removeprefix("run config: "))
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # a usage error (one line, see _Parser) or --help
        return int(stop.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)
    except Exception as error:  # noqa: BLE001 - the top: every error ends as one line
        if args.debug:
            raise
        print(f"pcvr: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
