"""Every key that crosses the network between the server and the sites, defined once.

Imported by both sides (as Flower does with ``differential_privacy_constants``). A new meaning
gets a new key; the meaning of an existing key never changes, so that a site running an older
clinfed never misreads a newer server.

What a site may send is closed: the record names and metric keys listed here are the only ones
the site's egress guard lets out (see :mod:`clinfed.client.mods`).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVALUATE_METRIC_KEYS",
    "METRICS",
    "QUERY_SITE_INFO",
    "SITE",
    "STATS",
    "TRAIN_METRIC_KEYS",
    "Keys",
]

# ------------------------------------------------------------------ record names in a RecordDict
ARRAYS: Final = "arrays"  # ArrayRecord: model parameters (Flower's default key)
CONFIG: Final = "config"  # ConfigRecord: server -> site instructions
METRICS: Final = "metrics"  # MetricRecord: site -> server scalar metrics
SITE: Final = "site"  # ConfigRecord: site -> server identity and schema fingerprint
STATS: Final = "stats"  # MetricRecord: site -> server feature aggregates for scaling

# ------------------------------------------------------------------ query message kinds
QUERY_SITE_INFO: Final = "site-info"


class Keys:
    """Keys inside the records above."""

    # server -> site (ConfigRecord CONFIG)
    QUERY: Final = "query"
    RUN_NAME: Final = "run-name"
    SERVER_ROUND: Final = "server-round"  # injected by Flower's strategies
    NUM_ROUNDS: Final = "num-rounds"
    LOCAL_EPOCHS: Final = "local-epochs"
    BATCH_SIZE: Final = "batch-size"
    LR: Final = "lr"
    MOMENTUM: Final = "momentum"
    MAX_GRAD_NORM: Final = "max-grad-norm"
    DP: Final = "dp"
    PROXIMAL_MU: Final = "proximal-mu"  # injected by Flower's FedProx
    MODEL_NAME: Final = "model-name"
    MODEL_HIDDEN: Final = "model-hidden"
    MODEL_DROPOUT: Final = "model-dropout"
    SCALING: Final = "scaling"

    # site -> server (ConfigRecord SITE)
    SITE_NAME: Final = "name"
    SCHEMA_FINGERPRINT: Final = "schema-fingerprint"
    NUM_FEATURES: Final = "num-features"
    NUM_CLASSES: Final = "num-classes"

    # site -> server (MetricRecord STATS): per encoded feature, over the training split
    STATS_COUNT: Final = "count"
    STATS_SUM: Final = "sum"
    STATS_SUM_SQ: Final = "sum-sq"

    # site -> server (MetricRecord METRICS)
    NUM_EXAMPLES: Final = "num-examples"  # FedAvg's weighting key
    TRAIN_LOSS: Final = "train-loss"
    EPSILON: Final = "epsilon"
    DELTA: Final = "delta"
    NOISE_MULTIPLIER: Final = "noise-multiplier"
    LOSS: Final = "loss"
    ACCURACY: Final = "accuracy"
    ROC_AUC: Final = "roc-auc"


TRAIN_METRIC_KEYS: Final = frozenset(
    {Keys.NUM_EXAMPLES, Keys.TRAIN_LOSS, Keys.EPSILON, Keys.DELTA, Keys.NOISE_MULTIPLIER}
)
EVALUATE_METRIC_KEYS: Final = frozenset(
    {Keys.NUM_EXAMPLES, Keys.LOSS, Keys.ACCURACY, Keys.ROC_AUC, Keys.EPSILON}
)
