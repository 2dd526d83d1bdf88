"""Deployment: the federation's PKI, site and server launchers, and the site preflight."""

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
