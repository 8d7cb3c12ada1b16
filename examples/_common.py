"""Shared flags for the per-model example scripts."""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl

from lightning_gradguard import GradGuard


def parser(description: str, default_lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--lr", type=float, default=default_lr, help="learning rate")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "sgd_momentum", "adam", "rmsprop"])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-guard", action="store_true", help="train without GradGuard")
    p.add_argument("--clip-val", type=float, default=None,
                   help="Lightning's gradient_clip_val (the classic remedy)")
    p.add_argument("--logdir", default="lightning_logs")
    return p


def fit(model: pl.LightningModule, data: pl.LightningDataModule, args: Any) -> None:
    guard = None if args.no_guard else GradGuard()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, callbacks=[guard] if guard else [],
        gradient_clip_val=args.clip_val, default_root_dir=args.logdir,
        enable_checkpointing=False, log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)
    print({k: round(float(v), 5) for k, v in trainer.callback_metrics.items()})
    if guard is not None:
        print(guard.summary())
