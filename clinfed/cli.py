"""The ``clinfed`` command line.

User mistakes (a bad config, bad site data, a privacy request that cannot be met) end in one line
on stderr that says what is wrong and how to fix it, and exit status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clinfed._logging import configure_logging, undo_opacus_root_handler
from clinfed.errors import ClinfedError, ConfigError

__all__ = ["main"]


def _simulate(args: argparse.Namespace) -> int:
    from clinfed.config import load_simulation_config  # noqa: PLC0415 - keep --help fast
    from clinfed.server.results import format_summary  # noqa: PLC0415
    from clinfed.simulation import check_sites, run_simulated_federation  # noqa: PLC0415

    undo_opacus_root_handler()
    config = load_simulation_config(args.config, args.overrides)
    check_sites(config)  # bad site data fails here, in one line, before any process starts
    outcome = run_simulated_federation(config)
    # Printed here, in the main thread, once Flower's engine has shut down.
    print(format_summary(outcome.result), end="", flush=True)
    print(f"\nresults: {outcome.folder}", flush=True)
    evaluation = outcome.result.evaluation
    if evaluation is not None:
        from clinfed.baselines import add_baselines  # noqa: PLC0415
        from clinfed.server.report import write_report  # noqa: PLC0415
        from clinfed.server.results import write_evaluation  # noqa: PLC0415

        if config.run.report.baselines:
            add_baselines(config, evaluation)
            write_evaluation(evaluation, outcome.folder)
        print(f"report:  {write_report(outcome.folder)}", flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from clinfed.server.report import write_report  # noqa: PLC0415

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(
            f"results folder {folder} does not exist. Give a folder a run wrote, e.g. "
            "results/demo-20261123-204500."
        )
    print(write_report(folder))
    return 0


def _check_site(args: argparse.Namespace) -> int:
    from clinfed.client.site import describe_site  # noqa: PLC0415
    from clinfed.config import load_site_config  # noqa: PLC0415

    undo_opacus_root_handler()
    site = load_site_config(args.site_config)
    print(describe_site(site))
    return 0


def _ledger_show(args: argparse.Namespace) -> int:
    from clinfed.client.policy import load_site_policy  # noqa: PLC0415
    from clinfed.config import load_site_config  # noqa: PLC0415
    from clinfed.errors import ConfigError  # noqa: PLC0415
    from clinfed.privacy.ledger import PrivacyLedger  # noqa: PLC0415

    site = load_site_config(args.site_config)
    g = site.governance
    if not g.policy:
        raise ConfigError(f"site {site.name} has no governance.policy; there is no ledger to show.")
    budget = load_site_policy(g.policy).budget
    with PrivacyLedger.open(g.ledger) as ledger:
        summary = ledger.summary(
            delta=budget.delta, accountant=budget.accountant, total_epsilon=budget.epsilon
        )
        print(summary.as_text())
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from clinfed.client.audit import verify_audit_log  # noqa: PLC0415

    report = verify_audit_log(args.audit_log)
    if report.ok:
        print(f"audit log {args.audit_log}: OK, {report.entries} entries, head {report.head}")
        return 0
    print(
        f"clinfed: error: audit log {args.audit_log} is damaged at line {report.line} "
        f"(entry {report.index}): {report.problem}: {report.detail}",
        file=sys.stderr,
    )
    return 2


def _pki_init(args: argparse.Namespace) -> int:
    from clinfed.deploy.pki import create_federation_pki  # noqa: PLC0415

    pki = create_federation_pki(Path(args.dir), server_hosts=args.server_host, sites=args.site)
    print(f"federation CA:       {pki.ca_certificate} (keep {pki.ca_key} offline)")
    print(f"server certificate:  {pki.server_certificate} + {pki.server_key}")
    for name, (private, public) in pki.site_keys.items():
        print(f"site {name}: {private} (to the hospital only), register {public}")
    return 0


def _pki_site_key(args: argparse.Namespace) -> int:
    from clinfed.deploy.pki import create_site_key  # noqa: PLC0415

    private, public = create_site_key(Path(args.dir), name=args.name)
    print(
        f"private key: {private} (stays here, mode 600)\npublic key:  {public} (send to the coordinating lab)"
    )
    return 0


def _app_hash(args: argparse.Namespace) -> int:
    import hashlib  # noqa: PLC0415

    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415

    app = Path(args.app)
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app folder (no pyproject.toml).")
    print(hashlib.sha256(build_fab_from_disk(app)).hexdigest())
    return 0


def _site_start(args: argparse.Namespace) -> int:
    from clinfed.deploy.launch import start_site  # noqa: PLC0415

    start_site(Path(args.site_config))
    return 0


def _server_start(args: argparse.Namespace) -> int:
    from clinfed.config import load_server_config  # noqa: PLC0415
    from clinfed.deploy.launch import start_server  # noqa: PLC0415

    start_server(load_server_config(args.server_config))
    return 0


def _preflight(args: argparse.Namespace) -> int:
    from clinfed.deploy.preflight import format_report, run_preflight  # noqa: PLC0415

    undo_opacus_root_handler()
    results = run_preflight(Path(args.site_config))
    print(format_report(results))
    return 0 if all(r.passed for r in results) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfed", description="Federated learning for hospitals."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser(
        "simulate",
        help="run a whole federation locally (Flower simulation engine)",
        description="Run the simulated federation in CONFIG; override any key with key=value.",
    )
    simulate.add_argument(
        "--config", default="conf/simulate.yaml", help="simulation config (default: %(default)s)"
    )
    simulate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. rounds=5 strategy.name=fedadam"
    )
    simulate.set_defaults(handler=_simulate)
    report = commands.add_parser(
        "report",
        help="render a run's HTML report from its results folder",
        description="Write FOLDER/report.html from the raw results a run wrote in FOLDER.",
    )
    report.add_argument("folder", help="a results folder, e.g. results/demo-20261123-204500")
    report.set_defaults(handler=_report)
    check = commands.add_parser(
        "check-site",
        help="validate a site config and its data against the schema (sends nothing)",
    )
    check.add_argument("site_config", help="the site's YAML config, e.g. /etc/clinfed/site.yaml")
    check.set_defaults(handler=_check_site)
    ledger = commands.add_parser("ledger", help="the site's privacy ledger")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    show = ledger_commands.add_parser(
        "show", help="epsilon spent and remaining, per run and per round"
    )
    show.add_argument("site_config", help="the site's YAML config")
    show.set_defaults(handler=_ledger_show)
    audit = commands.add_parser("audit", help="the site's audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain; name the first tampered entry"
    )
    verify.add_argument("audit_log", help="path of the audit log (JSON lines)")
    verify.set_defaults(handler=_audit_verify)

    pki = commands.add_parser("pki", help="the federation's certificates and site keys")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_commands.add_parser(
        "init", help="create the CA, the server certificate and site keys"
    )
    init.add_argument("--dir", required=True, help="new folder for the key material")
    init.add_argument(
        "--server-host",
        action="append",
        required=True,
        help="DNS name or IP the sites dial (repeat)",
    )
    init.add_argument(
        "--site", action="append", default=[], help="create a key pair for this site (repeat)"
    )
    init.set_defaults(handler=_pki_init)
    site_key = pki_commands.add_parser("site-key", help="a hospital creates its own key pair")
    site_key.add_argument("--dir", required=True, help="folder for auth-key and auth-key.pub")
    site_key.add_argument("--name", required=True, help="the site's name")
    site_key.set_defaults(handler=_pki_site_key)

    app_hash = commands.add_parser(
        "app-hash", help="the SHA-256 of the app bundle sites must approve"
    )
    app_hash.add_argument("app", nargs="?", default=".", help="the app folder (default: .)")
    app_hash.set_defaults(handler=_app_hash)

    site = commands.add_parser("site", help="run this hospital's site")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    start = site_commands.add_parser("start", help="start the SuperNode (dials out to the server)")
    start.add_argument("site_config", help="the site's YAML config")
    start.set_defaults(handler=_site_start)
    preflight = commands.add_parser(
        "preflight", help="check a site before it joins (sends no data)"
    )
    preflight.add_argument("site_config", help="the site's YAML config")
    preflight.set_defaults(handler=_preflight)

    server = commands.add_parser("server", help="run the coordinating lab's server")
    server_commands = server.add_subparsers(dest="server_command", required=True)
    server_start = server_commands.add_parser(
        "start", help="start the SuperLink (TLS + site authentication)"
    )
    server_start.add_argument("server_config", help="the server's YAML config")
    server_start.set_defaults(handler=_server_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clinfed`` command."""
    args = _parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.handler(args))
    except ClinfedError as error:
        print(f"clinfed: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clinfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
