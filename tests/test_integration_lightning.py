"""The Lightning callback: invisible to the training it probes (bit for bit on the CPU), the
same trajectory file as `smoothprof run`, the probe's values in the trainer's logger, and
what Lightning does (accumulation, clipping, AMP, schedulers, resuming) left as it is."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ASSETS, REPO
from torch import nn
from typer.testing import CliRunner

pl = pytest.importorskip("lightning.pytorch")

from smoothprof.cli import app  # noqa: E402
from smoothprof.errors import ConfigError  # noqa: E402
from smoothprof.integrations.lightning import SmoothnessCallback  # noqa: E402
from smoothprof.schedule import spread_steps  # noqa: E402
from smoothprof.trajectory import read_trajectory  # noqa: E402


class TinyClassifier(pl.LightningModule):
    """Batch norm and dropout (what a probe could disturb), AdamW with a step schedule, and a
    `self.log` in `training_step` (what the probe's evaluations must not reach)."""

    def __init__(self, lr=0.02, schedule=True):
        super().__init__()
        self.lr, self.schedule = lr, schedule
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)
        )
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        if not self.schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        every_step = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": every_step}


def loader():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(160, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)


def fit(tmp_path, callbacks, *, max_steps=12, ckpt_path=None, module=None, **trainer_options):
    pl.seed_everything(0, verbose=False)
    module = module if module is not None else TinyClassifier()
    trainer_options.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **trainer_options,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
        {"precision": "bf16-mixed", "gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"},
    ],
    ids=["plain", "accumulate-clip", "bf16-clip-value"],
)
def test_probing_is_invisible_to_the_training(tmp_path, options):
    _, plain = fit(tmp_path / "plain", [], **options)
    callback = SmoothnessCallback(tmp_path / "run.h5", every=3, probe_batches=2)
    _, probed = fit(tmp_path / "probed", [callback], **options)
    assert plain.losses == probed.losses and len(plain.losses) > 0
    for a, b in zip(weights(plain), weights(probed)):
        assert torch.equal(a, b)
    assert [r.step for r in callback.records] == [0, 3, 6, 9]
    trajectory = read_trajectory(tmp_path / "run.h5")
    assert trajectory.status == "closed" and trajectory.num_probes == 4
    assert np.isfinite(trajectory.probes["hessian_norm"]).all()
    assert np.isfinite(trajectory.probes["smoothness_fd"]).all()
    assert trajectory.train["step"].tolist() == list(range(12))


def test_the_file_records_how_lightning_trained(tmp_path):
    callback = SmoothnessCallback(tmp_path / "run.h5", num_probes=5, probe_batches=2)
    trainer, module = fit(tmp_path, [callback], accumulate_grad_batches=2, gradient_clip_val=0.5)
    trajectory = read_trajectory(tmp_path / "run.h5")
    config = trajectory.config
    assert config["optimizer"] == "adamw" and config["lr"] == 0.02
    assert config["scheduler"] == "StepLR" and config["clip"] == 0.5 and config["accumulate"] == 2
    assert config["optimizer_source"] == "trainer" and config["steps"] == 12
    assert config["probe_schedule"] == "auto" and config["num_probes"] == 5
    assert trajectory.attributes["trainer"].startswith("lightning ")
    assert trajectory.probes["step"].tolist() == list(spread_steps(12, 5)) == [0, 1, 3, 6, 11]
    # The training rows: the StepLR lr of each step, the mean loss of its two batches.
    train = trajectory.train
    assert np.allclose(train["lr"], [0.02 * 0.5 ** (s // 5) for s in range(12)], rtol=1e-12)
    pairs = np.asarray(module.losses).reshape(12, 2).sum(axis=1)  # each loss is divided by 2
    assert np.allclose(train["loss"], pairs, rtol=1e-6)
    assert np.all(train["grad_norm"] > 0) and train["clipped"].any()
    assert not train["skipped"].any()
    # AdamW: the edge of stability is measured after its first update.
    assert np.isfinite(trajectory.probes["preconditioned_sharpness"][1:]).all()
    # The probe's values reached the trainer's logger at their steps; the user's `self.log`
    # holds the training batches' losses only (the probe's evaluations were muted).
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    logged = {int(r["step"]): float(r["smoothprof/hessian_norm"]) for r in rows
              if r.get("smoothprof/hessian_norm")}  # fmt: skip
    assert sorted(logged) == [0, 1, 3, 6, 11]
    assert logged[6] == trajectory.probes["hessian_norm"][3]
    user = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert np.allclose(user, 2 * np.asarray(module.losses[1::2]), rtol=1e-6)  # each step's last
    # smoothprof's read commands work on it unchanged.
    for command in (["fit", "--json", "--bootstrap", "0"], ["plot"], ["report"]):
        if command == ["report"]:
            pytest.importorskip("matplotlib")
            command = ["report", "-o", str(tmp_path / "report")]
        result = CliRunner().invoke(app, [*command, str(tmp_path / "run.h5")])
        assert result.exit_code == 0, result.output
    # No `smoothprof run MODEL.py` sweep: that would train another program than this one.
    result = CliRunner().invoke(app, ["fit", "--bootstrap", "0", str(tmp_path / "run.h5")])
    assert result.exit_code == 0 and "clip_grad_norm_" in result.output
    assert "smoothprof run" not in result.output


def test_max_basis_bounds_the_probes_eigen_solver(tmp_path):
    # A basis of 4 against rtol 1e-8: every solve fills it and restarts, with the same
    # certificate; the file records the bound.
    callback = SmoothnessCallback(tmp_path / "run.h5", every=4, probe_batches=2, max_basis=4,
                                  rtol=1e-8, max_hvps=300)  # fmt: skip
    probes = []
    original = SmoothnessCallback.on_train_start

    def started(self, trainer, module):
        original(self, trainer, module)
        probes.append(self._probe.probe)

    callback.on_train_start = started.__get__(callback)
    fit(tmp_path, [callback])
    trajectory = read_trajectory(tmp_path / "run.h5")
    assert trajectory.config["max_basis"] == 4
    # (AdamW: the preconditioned sharpness's solves restart too)
    assert probes[0].max_basis == 4 and probes[0].restarted_solves >= len(callback.records) == 3
    assert trajectory.probes["hessian_converged"].all()


def test_the_probe_is_fitted_to_the_memory_as_smoothprof_run_fits_it(tmp_path, monkeypatch, caplog):
    import math

    import smoothprof.integrations.trainer_probe as trainer_probe
    import smoothprof.train
    from smoothprof.memory import DEVICE_SHARE

    counted = []
    count = trainer_probe.count_memory_footprint

    def counting(*args, **kwargs):
        counted.append(count(*args, **kwargs))
        return counted[-1]

    monkeypatch.setattr(trainer_probe, "count_memory_footprint", counting)
    # A limit no probe meets stops before training, with what it would take, and no file.
    callback = SmoothnessCallback(tmp_path / "a.h5", every=3, probe_batches=2, probe_memory=1.01)
    with pytest.raises(ConfigError, match=r"cannot fit probe_memory=1.01.*allow probe_memory="):
        fit(tmp_path, [callback])
    assert not (tmp_path / "a.h5").exists()
    # A device that holds the probe with a basis of 10, not 20: the basis is 10, and said so.
    two_batches = counted[-1].probe_bytes(10, retained_graphs=0, hvp_method="auto")
    total = math.ceil(two_batches / DEVICE_SHARE) + 1
    monkeypatch.setattr(smoothprof.train, "device_memory_bytes", lambda device: total)
    callback = SmoothnessCallback(tmp_path / "b.h5", every=3, probe_batches=2)
    with caplog.at_level("WARNING", logger="smoothprof"):
        fit(tmp_path, [callback])
    assert "probe memory: about" in caplog.text and "at max_basis=10" in caplog.text
    config = read_trajectory(tmp_path / "b.h5").config
    assert config["max_basis"] == 10 and config["probe_memory_estimate"]["changed"]
    assert all(r.hessian_converged for r in callback.records)


def test_resuming_from_a_checkpoint_appends_to_the_file(tmp_path):
    path = tmp_path / "run.h5"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6)
    first = SmoothnessCallback(path, every=2, probe_batches=2)
    fit(tmp_path, [first, checkpoint], max_steps=8, enable_checkpointing=True)
    [saved] = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert "step=6" in saved.name
    # The run dies after step 8; resumed from step 6, it trains steps 6 and 7 again.
    second = SmoothnessCallback(path, every=2, probe_batches=2)
    fit(tmp_path, [second], max_steps=12, ckpt_path=saved)
    trajectory = read_trajectory(path)
    assert trajectory.probes["step"].tolist() == [0, 2, 4, 6, 8, 10]
    assert trajectory.train["step"].tolist() == list(range(12))
    assert trajectory.attributes["resumed_at_steps"] == [6]
    # A new run does not overwrite it unless asked.
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        fit(tmp_path, [SmoothnessCallback(path, every=2, probe_batches=2)], max_steps=2)


def test_options_that_cannot_work_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="not every and num_probes"):
        SmoothnessCallback(tmp_path / "a.h5", every=3, num_probes=4)
    with pytest.raises(ConfigError, match="unknown estimator"):
        SmoothnessCallback(tmp_path / "a.h5", estimators=["hvp", "nope"])
    with pytest.raises(ConfigError, match="no such directory"):
        SmoothnessCallback(tmp_path / "missing" / "a.h5")
    with pytest.raises(ConfigError, match="max_basis must be an integer >= 4"):
        SmoothnessCallback(tmp_path / "a.h5", max_basis=3)
    callback = SmoothnessCallback(tmp_path / "a.h5", probe_batches=11)  # 10 batches of 16 exist
    with pytest.raises(ConfigError, match="the training dataset has 160: ask for at most 10"):
        fit(tmp_path, [callback], max_steps=2)


def test_the_documented_example_runs(tmp_path, monkeypatch):
    doc = (REPO / "docs" / "trainers.md").read_text()
    section = doc.split("## Lightning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/trainers.md", "exec"), {"__name__": "example"})
    trajectory = read_trajectory(tmp_path / "lightning.h5")
    assert trajectory.num_probes > 3 and math.isfinite(trajectory.probes["hessian_norm"][-1])


def test_ddp_every_rank_probes_rank_0_writes_and_the_training_is_unchanged(tmp_path):
    """Lightning's ddp_spawn, 2 CPU processes: the same weights with and without the callback,
    one file with every probe."""
    process = subprocess.run(
        [sys.executable, str(ASSETS / "lightning_ddp.py"), str(tmp_path / "ddp.h5")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads(process.stdout.splitlines()[-1]) == {"same_weights": True}
    trajectory = read_trajectory(tmp_path / "ddp.h5")
    assert trajectory.status == "closed" and trajectory.attributes["world_size"] == 2
    assert trajectory.probes["step"].tolist() == [0, 2, 4]
    assert np.isfinite(trajectory.probes["hessian_norm"]).all()
    assert trajectory.train["step"].tolist() == list(range(6))
