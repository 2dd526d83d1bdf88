"""Deployment: the federation's PKI, site and server launchers, and the site preflight.

The names below are imported on first use (PEP 562): ``clinfed-clientapp`` imports
``clinfed.deploy.warm`` once per task and must not pay for torch and Flower to do it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clinfed.deploy.launch import AppNotApprovedError, check_app_approved
    from clinfed.deploy.pki import create_federation_pki, create_site_key
    from clinfed.deploy.preflight import run_preflight

__all__ = [
    "AppNotApprovedError",
    "check_app_approved",
    "create_federation_pki",
    "create_site_key",
    "run_preflight",
]

_HOME = {
    "AppNotApprovedError": "clinfed.deploy.launch",
    "check_app_approved": "clinfed.deploy.launch",
    "create_federation_pki": "clinfed.deploy.pki",
    "create_site_key": "clinfed.deploy.pki",
    "run_preflight": "clinfed.deploy.preflight",
}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'clinfed.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
