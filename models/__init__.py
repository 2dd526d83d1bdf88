"""The model zoo: every model is created by name from the registry."""

from clinfed.models import tabular as _tabular  # noqa: F401 - registers logreg, mlp
from clinfed.models import vision as _vision  # noqa: F401 - registers cnn
from clinfed.models.registry import create_model, register_model, registered_models
from clinfed.models.tabular import Standardize

__all__ = ["Standardize", "create_model", "register_model", "registered_models"]
