"""The GradGuard callback tests: models and helpers live in ``_helpers``; the one-thread,
quiet-Lightning fixture is the suite's (``tests/conftest.py``)."""
