"""A site reconnects with Flower's backoff; the site config can bound how long it keeps trying."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinfed.config import SiteConfig, SiteConnectionConfig, SiteDataConfig
from clinfed.deploy.launch import site_arguments
from clinfed.errors import ConfigError


def _site(**connection: object) -> SiteConfig:
    return SiteConfig(
        name="paris",
        data=SiteDataConfig(path="d.csv", schema="s.yaml"),
        connection=SiteConnectionConfig(
            superlink="fl.example.org:9093", insecure=True, **connection
        ),  # type: ignore[arg-type]
    )


def test_by_default_a_site_retries_forever(tmp_path: Path) -> None:
    args = site_arguments(_site(), tmp_path / "site.yaml")

    assert "--max-retries" not in args and "--max-wait-time" not in args


def test_the_site_config_bounds_reconnection(tmp_path: Path) -> None:
    args = site_arguments(
        _site(reconnect_max_retries=20, reconnect_max_wait_s=900.0), tmp_path / "site.yaml"
    )

    assert args[args.index("--max-retries") + 1] == "20"
    assert args[args.index("--max-wait-time") + 1] == "900"


@pytest.mark.parametrize(
    "bad", [{"reconnect_max_retries": -1}, {"reconnect_max_wait_s": float("inf")}]
)
def test_bad_reconnect_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"connection\.reconnect_max"):
        _site(**bad)


def test_flower_supernode_accepts_the_flags() -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parsed = _parse_args_run_supernode().parse_args(
        ["--insecure", "--max-retries", "20", "--max-wait-time", "900"]
    )

    assert (parsed.max_retries, parsed.max_wait_time) == (20, 900.0)
