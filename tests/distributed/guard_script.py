"""Two-process GradGuard run on CPU (gloo), launched by ``test_strategies.py``.

Usage: ``python guard_script.py {ddp,fsdp2,fsdp1,ddp_rollback} OUTDIR``. Lightning's
launcher re-executes this script for rank 1 (``LOCAL_RANK=1``); every rank writes
``OUTDIR/rank{r}.json`` with the guard's summary, what it decided at each step, the
unsharded gradient norm measured independently of the guard (before and after it acted), the
full parameters after each step and how many times the guard wrote to the logger.

Faults (all on rank 1 only, see ``FAULTS``):

* step 2: the loss is NaN -> its gradients are NaN, the gradient reduction spreads them;
* step 4: one gradient element is set to NaN on rank 1 *after* the reduction (DDP: grads
  already all-reduced; FSDP: in rank 1's local shard) -> only the guard's reduction can
  make rank 0 agree;
* step 6: a NaN term *without gradient* is added to rank 1's loss -> every gradient is
  finite, only rank 1's loss is not (the loss is never all-reduced);
* step 8: rank 1's loss is multiplied by 1e4 -> a gradient spike on every rank, clipped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402
from lightning_gradguard.testing import Fault, FaultInjector  # noqa: E402

MAX_STEPS = 10
NAN_LOSS_STEP = 2
NAN_GRAD_STEP = 4
NAN_LOSS_ONLY_STEP = 6
SPIKE_STEP = 8
FAULTS = [
    Fault(step=NAN_LOSS_STEP, kind="nan", target="loss", ranks=(1,)),
    Fault(step=SPIKE_STEP, kind="scale", factor=1e4, target="loss", ranks=(1,)),
]


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t  # type: ignore[attr-defined,no-any-return]


class Net(pl.LightningModule):
    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.strategy_name = strategy
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g)
        y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
        self.data = TensorDataset(x, y)

    def configure_model(self) -> None:
        if self.strategy_name == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step == NAN_LOSS_ONLY_STEP and self.global_rank == 1:
            loss = loss + torch.tensor(float("nan"))  # no gradient: grads stay finite
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=8, shuffle=False)


class GradNaNOnRank1(Callback):
    """NaN into rank 1's gradients after the reduction (its local shard under FSDP)."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == NAN_GRAD_STEP and trainer.global_rank == 1:
            for p in pl_module.parameters():
                if p.grad is not None and _local(p.grad).numel() > 0:
                    _local(p.grad).view(-1)[0] = float("nan")
                    return


def _fsdp1_root(trainer: pl.Trainer) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model
    return model if isinstance(model, FullyShardedDataParallel) else None


def full_grad_norm(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """The norm of the unsharded gradients, computed without lightning_gradguard."""
    params = list(pl_module.parameters())
    if all(p.grad is None for p in params):
        return None
    root = _fsdp1_root(trainer)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root, with_grads=True):
            grads = [p.grad.detach().clone() for p in root.parameters() if p.grad is not None]
    else:
        grads = [p.grad.full_tensor() if _is_dtensor(p.grad) else p.grad
                 for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.double()) for g in grads])))


def full_params(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float]:
    root = _fsdp1_root(trainer)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root):
            return [float(v) for p in root.parameters() for v in p.detach().reshape(-1)]
    out = []
    for p in pl_module.parameters():
        t = p.full_tensor() if _is_dtensor(p) else p.detach()
        out.extend(float(v) for v in t.reshape(-1))
    return out


class Before(Callback):
    """Listed before GradGuard: the reference norm of what the guard is about to see."""

    def __init__(self) -> None:
        self.ref: dict[int, float | None] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.ref[trainer.global_step] = full_grad_norm(trainer, pl_module)


class After(Callback):
    """Listed after GradGuard: its decision, the grads it left, the params after the step."""

    def __init__(self, guard: GradGuard, before: Before) -> None:
        self.guard = guard
        self.before = before
        self.steps: list[dict[str, Any]] = []
        self.params: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        r = self.guard.last_reports[0]
        self.steps.append({
            "step": trainer.global_step, "action": r.action.value, "finite": r.finite,
            "spike": r.spike, "grad_norm": r.grad_norm, "grad_norm_clipped": r.grad_norm_clipped,
            "threshold": r.threshold, "lr_scale": r.lr_scale,
            "loss": r.loss, "ref_norm": self.before.ref.get(trainer.global_step),
            "grads_cleared": all(p.grad is None for p in pl_module.parameters()),
            "ref_norm_after": full_grad_norm(trainer, pl_module),
        })

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.params[trainer.global_step - 1] = full_params(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params[-1] = full_params(trainer, pl_module)


class RecordingLogger(Logger):
    """Records every call, on every rank (no rank-zero filtering of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


#: ``ddp_rollback``: ``GradGuard(rollback=True, snapshot_every=2)``; after step 4 rank 1's
#: first weight gets an Inf (behind tanh: loss and gradients stay finite), only there.
ROLLBACK_FAULTS = [Fault(step=4, kind="inf", target="param", params="net.0.weight",
                         ranks=(1,))]


def make_strategy(name: str) -> Any:
    if name in ("ddp", "ddp_rollback"):
        return "ddp"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        class CPUFSDPStrategy(FSDPStrategy):
            """Test only: Lightning refuses FSDP on CPU, torch needs ``device_id=cpu``."""

            def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
                from torch.distributed.fsdp import FullyShardedDataParallel

                return FullyShardedDataParallel(module=model, device_id=torch.device("cpu"),
                                                sharding_strategy=self.sharding_strategy,
                                                **self.kwargs)

        return CPUFSDPStrategy()
    raise ValueError(name)


def main(strategy: str, outdir: Path) -> None:
    pl.seed_everything(0, verbose=False)
    rollback = strategy == "ddp_rollback"
    guard = GradGuard(rollback=True, snapshot_every=2) if rollback else GradGuard()
    faults: list[Any] = [FaultInjector(ROLLBACK_FAULTS)] if rollback else [
        FaultInjector(FAULTS), GradNaNOnRank1()]
    before = Before()
    after = After(guard, before)
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=make_strategy(strategy), max_steps=MAX_STEPS,
        logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*faults, before, guard, after],
        default_root_dir=str(outdir),
    )
    trainer.fit(Net(strategy))
    rank = trainer.global_rank
    out = {
        "rank": rank, "world_size": trainer.world_size, "summary": guard.summary(),
        "steps": after.steps, "params": {str(k): v for k, v in after.params.items()},
        "logged": sum(1 for c in logger.calls if any(k.startswith("gradguard/") for k in c)),
    }
    (outdir / f"rank{rank}.json").write_text(json.dumps(out))
    # rank 0 launched rank 1: wait for it, so that the caller only has to wait for rank 0
    for proc in getattr(trainer.strategy.launcher, "procs", []):
        proc.wait(timeout=120)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    os._exit(0)  # skip slow interpreter teardown of the gloo/Lightning threads
