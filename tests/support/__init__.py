"""Shared fixtures and helpers of the test suite, one module per concept.

Import them by module, e.g. ``from support.trainer import fit``: ``tests/`` is on ``sys.path``
because ``tests/conftest.py`` is a rootdir conftest in a folder without ``__init__.py``
(pytest's default ``prepend`` import mode puts that folder first; the conftest also adds it
for ``--import-mode=importlib``). Never import them as ``tests.support``: that name only
resolves under ``python -m pytest`` and would load a second copy of every module.

- :mod:`support.modules`: tiny models and their data -- ``TinyModule`` (batches chosen by
  ``global_step``, any optimizer / scheduler / param groups), ``TinyRegression`` (a plain
  loader-driven regression, for any Lightning namespace via ``tiny_regression_class``),
  ``TwoNetManual`` (two optimizers, manual optimization), ``NaNFrom`` (a loss that turns NaN),
  ``make_net``, ``make_data``, ``build_optimizer``, ``build_scheduler``.
- :mod:`support.trainer`: ``make_trainer``, ``fit``, ``precision_kwargs``, ``run_config``.
- :mod:`support.state`: ``params_of``, ``all_finite``, ``opt_tensors``, ``policy_state``,
  ``assert_state_equal`` (bit-identical, NaN equals NaN at the same place),
  ``assert_state_close``.
- :mod:`support.recorders`: callbacks that record what a run did -- ``Recorder``,
  ``StateAround``, ``ClearGradsAt``, ``NonFiniteRecorder``.
- :mod:`support.core`: for plain-torch loops over ``GuardCore`` -- ``batches``, ``loss_fn``,
  and ``HYP``, the Hypothesis settings of the core's property tests.
- :mod:`support.syncs`: ``count_syncs``, a host-synchronisation counter code under test
  cannot step around, and ``nonzero``.
"""
