"""Every package has a small public surface, and every name it exports resolves."""

import importlib

import pytest

PACKAGES = [
    "clinfed",
    "clinfed.config",
    "clinfed.errors",
    "clinfed.wire",
    "clinfed.cli",
    "clinfed.simulation",
    "clinfed.client",
    "clinfed.client.app",
    "clinfed.client.data",
    "clinfed.client.metrics",
    "clinfed.client.conformal",
    "clinfed.client.report",
    "clinfed.client.mods",
    "clinfed.client.site",
    "clinfed.client.training",
    "clinfed.server",
    "clinfed.server.app",
    "clinfed.server.federation",
    "clinfed.server.results",
    "clinfed.server.evaluation",
    "clinfed.server.report",
    "clinfed.baselines",
    "clinfed.server.strategies",
    "clinfed.models",
    "clinfed.models.registry",
    "clinfed.models.scaling",
    "clinfed.privacy",
    "clinfed.privacy.accountant",
    "clinfed.privacy.secagg",
    "clinfed.privacy.ledger",
    "clinfed.privacy.mia",
    "clinfed.client.policy",
    "clinfed.client.audit",
    "clinfed.client.governance",
    "clinfed.client.secure",
    "clinfed.server.secure",
    "clinfed.deploy",
    "clinfed.deploy.pki",
    "clinfed.deploy.launch",
    "clinfed.deploy.preflight",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not exist"
    assert len(exported) == len(set(exported))
