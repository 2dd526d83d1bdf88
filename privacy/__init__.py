"""Differential privacy accounting and secure aggregation for clinfed."""

from clinfed.privacy.accountant import DPStep, calibrate_noise, epsilon_spent, planned_steps

__all__ = ["DPStep", "calibrate_noise", "epsilon_spent", "planned_steps"]
