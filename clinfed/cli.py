"""The ``clinfed`` command line.

User mistakes (a bad config, bad site data, a privacy request that cannot be met) end in one line
on stderr that says what is wrong and how to fix it, and exit status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clinfed._logging import configure_logging, undo_opacus_root_handler
from clinfed.errors import ClinfedError

__all__ = ["main"]


def _simulate(args: argparse.Namespace) -> int:
    from clinfed.config import load_simulation_config  # noqa: PLC0415 - keep --help fast
    from clinfed.simulation import check_sites, run_simulated_federation  # noqa: PLC0415

    undo_opacus_root_handler()
    config = load_simulation_config(args.config, args.overrides)
    check_sites(config)  # bad site data fails here, in one line, before any process starts
    outcome = run_simulated_federation(config)
    print(f"\nresults: {outcome.folder}")
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
