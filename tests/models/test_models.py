"""Contract tests that every registered model must pass."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from clinfed.client.training import TrainSettings, evaluate, train
from clinfed.errors import ConfigError
from clinfed.models import create_model, register_model, registered_models

# (num_features, num_classes) per model: tabular binary and multi-class; a 1x16x16 image.
SHAPES = {"logreg": [(16, 2), (16, 5)], "mlp": [(16, 2), (16, 5)], "cnn": [(256, 2), (256, 3)]}
CASES = [(name, f, c) for name in registered_models() for f, c in SHAPES.get(name, [(16, 2)])]


def test_the_zoo_has_the_promised_models() -> None:
    assert {"logreg", "mlp", "cnn"} <= set(registered_models())


@pytest.mark.parametrize(("name", "num_features", "num_classes"), CASES)
def test_model_passes_opacus_validator(name: str, num_features: int, num_classes: int) -> None:
    model = create_model(name, num_features=num_features, num_classes=num_classes, hidden=[8])

    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize(("name", "num_features", "num_classes"), CASES)
def test_model_trains_with_dp_and_keeps_its_parameter_names(
    name: str, num_features: int, num_classes: int
) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_features=num_features, num_classes=num_classes, hidden=[8])
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, num_features)
    y = torch.randint(0, num_classes, (40,))

    result = train(
        model,
        x,
        y,
        settings=TrainSettings(epochs=1, batch_size=8, lr=0.1, max_grad_norm=1.0),
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    metrics = evaluate(model, x, y)

    assert list(model.state_dict()) == keys  # no Opacus "_module." prefixes leak out
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.steps == 5
    assert 0.0 <= metrics.accuracy <= 1.0


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.name must be one of .*logreg"):
        create_model("resnet", num_features=3, num_classes=2)


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("logreg")(lambda **_: torch.nn.Linear(1, 1))


def test_cnn_refuses_non_square_inputs() -> None:
    with pytest.raises(ConfigError, match="square images"):
        create_model("cnn", num_features=100 + 1, num_classes=2)
