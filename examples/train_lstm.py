"""LSTM (or plain RNN) on the adding problem: a long-range task where gradients explode.

    python examples/train_lstm.py --lr 1.0 --no-guard          # explodes within ~60 steps
    python examples/train_lstm.py --lr 1.0                     # GradGuard keeps it finite
    python examples/train_lstm.py --lr 1.0 --no-guard --clip-val 1.0
"""

from __future__ import annotations

import lightning.pytorch as pl
from _common import fit, parser

from lightning_gradguard.demos import AddingProblemDataModule, AddingProblemRNN

if __name__ == "__main__":
    p = parser(__doc__ or "", default_lr=1.0)
    p.add_argument("--cell", default="lstm", choices=["lstm", "rnn"])
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--hidden-size", type=int, default=32)
    args = p.parse_args()
    pl.seed_everything(args.seed)
    model = AddingProblemRNN(cell=args.cell, hidden_size=args.hidden_size,
                             optimizer=args.optimizer, lr=args.lr)
    fit(model, AddingProblemDataModule(seq_len=args.seq_len, num_samples=4096, batch_size=64),
        args)
