"""``gradguard report`` on real runs (GradGuard + a fault, GradientMonitor) and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.callbacks import GradGuard, GradientMonitor
from lightning_gradguard.cli import main
from lightning_gradguard.report import load_runs
from lightning_gradguard.testing import Fault, FaultInjector

pytestmark = [
    pytest.mark.filterwarnings("ignore:GradGuard. step:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*"),
]

NAN_STEP = 7


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 4, generator=g)
        y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
        return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(logdir: Path, version: str, callbacks: list[Callback], steps: int = 24) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=2,
        logger=TensorBoardLogger(str(logdir), name="", version=version),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        _fit(root, "guarded", [FaultInjector([Fault(step=NAN_STEP, kind="nan")]), GradGuard()])
        _fit(root, "monitored", [GradientMonitor()])
        return root
    finally:
        torch.set_num_threads(threads)


def test_load_runs_finds_both_runs(logdir: Path) -> None:
    runs = {r.name: r for r in load_runs(logdir)}
    assert set(runs) == {"guarded", "monitored"}
    assert runs["guarded"].events("gradguard/skipped_steps") == [NAN_STEP]
    assert "gradguard/layer_norm/net.0" in runs["monitored"].scalars
    assert "train_loss" in runs["guarded"].scalars


def test_report_cli_writes_png_and_summary(logdir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    png = tmp_path / "out" / "report.png"
    assert main(["report", str(logdir), "-o", str(png)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert png.is_file()
    assert png.stat().st_size > 20_000
    with Image.open(png) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert w > 600
    assert h > 400
    assert w > h  # two runs side by side
    assert "guarded:" in out
    assert "monitored:" in out
    assert f"skipped steps: 1 (first at step {NAN_STEP})" in out
    assert "non-finite steps: 1" in out
    assert "grad norm: min" in out
    assert f"wrote {png}" in out


def test_report_default_output_path(logdir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # copy one run so the default PNG (LOGDIR/gradguard_report.png) lands in tmp_path
    import shutil

    root = tmp_path / "logs"
    shutil.copytree(logdir / "guarded", root / "guarded")
    assert main(["report", str(root)]) == 0
    png = root / "gradguard_report.png"
    assert png.is_file()
    assert png.stat().st_size > 20_000
    assert "skipped steps: 1" in capsys.readouterr().out


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert "gradguard report: error: log directory not found" in err
    assert str(missing) in err
    assert out == ""
    assert not missing.exists()


def test_directory_without_event_files(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hi")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "no TensorBoard event files" in err
    assert not (tmp_path / "r.png").exists()


def test_event_files_without_gradguard_tags(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _fit(tmp_path, "plain", [], steps=4)
    assert list((tmp_path / "plain").glob("events.out.tfevents.*"))
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "gradguard tags" in err
    assert not (tmp_path / "r.png").exists()


def test_nonfinite_loss_markers_are_inside_a_log_scaled_loss_panel() -> None:
    """A run whose loss went from huge to NaN: the finite part puts the panel on a log scale,
    where y = 0 does not exist; the NaN markers must still be drawn inside the panel."""
    import matplotlib.pyplot as plt

    from lightning_gradguard.report import RunData, _draw

    steps = list(range(10))
    loss = [1e3 * 10.0**s for s in range(4)] + [float("nan")] * 6
    run = RunData("diverged", {"train_loss": (steps, loss),
                               "gradguard/grad_norm": (steps, [1.0] * 10)})
    fig = _draw([run])
    try:
        ax = fig.axes[2]
        assert ax.get_yscale() == "log"
        (markers,) = [c for c in ax.collections if c.get_label() == "non-finite loss (6)"]
        fig.canvas.draw()
        pts = markers.get_offset_transform().transform(markers.get_offsets())
        box = ax.get_window_extent()
        assert len(pts) == 6
        assert all(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for x, y in pts)
    finally:
        plt.close(fig)
