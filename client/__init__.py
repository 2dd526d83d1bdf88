"""What runs inside a hospital: data loading, DP training, evaluation and the ClientApp."""

from clinfed.client.training import EvalResult, TrainResult, TrainSettings, evaluate, train

__all__ = ["EvalResult", "TrainResult", "TrainSettings", "evaluate", "train"]
