"""``python -m lightning_gradguard`` is the ``gradguard`` console script."""

from lightning_gradguard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
