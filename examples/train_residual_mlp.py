"""Residual MLP (skip connections), optionally with BatchNorm.

    python examples/train_residual_mlp.py --lr 0.5 --no-guard
    python examples/train_residual_mlp.py --lr 0.5
"""

from __future__ import annotations

import lightning.pytorch as pl
from _common import fit, parser

from lightning_gradguard.demos import RegressionDataModule, ResidualMLP

if __name__ == "__main__":
    p = parser(__doc__ or "", default_lr=0.5)
    p.add_argument("--init", default="default", choices=["default", "xavier", "he", "too_large"])
    p.add_argument("--batch-norm", action="store_true")
    args = p.parse_args()
    pl.seed_everything(args.seed)
    model = ResidualMLP(init=args.init, batch_norm=args.batch_norm, optimizer=args.optimizer,
                        lr=args.lr)
    fit(model, RegressionDataModule(num_samples=2048, batch_size=64), args)
