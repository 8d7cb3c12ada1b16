"""Deep plain MLP: explodes with a high LR; remedies: --init he/xavier, --batch-norm, lower
--lr, --optimizer adam, --clip-val, or GradGuard (on by default).

    python examples/train_deep_mlp.py --lr 0.1 --no-guard     # explodes
    python examples/train_deep_mlp.py --lr 0.1                # GradGuard keeps it finite
"""

from __future__ import annotations

import lightning.pytorch as pl
from _common import fit, parser

from lightning_gradguard.demos import DeepMLP, RegressionDataModule

if __name__ == "__main__":
    p = parser(__doc__ or "", default_lr=0.1)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--activation", default="relu")
    p.add_argument("--init", default="he", choices=["default", "xavier", "he", "too_large"])
    p.add_argument("--batch-norm", action="store_true")
    args = p.parse_args()
    pl.seed_everything(args.seed)
    model = DeepMLP(depth=args.depth, width=args.width, activation=args.activation,
                    init=args.init, batch_norm=args.batch_norm, optimizer=args.optimizer,
                    lr=args.lr)
    fit(model, RegressionDataModule(num_samples=2048, batch_size=64), args)
