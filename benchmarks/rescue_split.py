"""The rescue benchmark's train / validation split (issue 14), fixed before any result.

Rules are chosen on the tuning set only; the validation set is run once, at the end, with
the rule set frozen. The reasons are in ``benchmarks/results/rescue_split.md``.
"""

from __future__ import annotations

__all__ = ["TUNING_SEEDS", "TUNING_WORKLOADS", "VALIDATION_ONLY_WORKLOADS", "VALIDATION_SEEDS"]

TUNING_WORKLOADS = ("lstm_lm", "mlp_sgd", "mlp_adam_fault", "mlp_sgd_fault", "tf_pre_warm")
VALIDATION_ONLY_WORKLOADS = ("tf_pre_nowarm", "tf_post_warm", "tf_post_nowarm", "resnet_bn",
                             "irnn", "mlp_sgd_long")
TUNING_SEEDS = (0, 1, 2)
VALIDATION_SEEDS = (3, 4, 5)
