"""The Hugging Face Trainer callback on a two-layer GPT-2 built from a config (no download):
invisible to the training (bit for bit on the CPU), the same trajectory file as `smoothprof
run`, the probe's values in the Trainer's log, and resuming from a checkpoint."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from smoothprof.cli import app  # noqa: E402
from smoothprof.errors import ConfigError  # noqa: E402
from smoothprof.integrations.transformers import SmoothnessCallback  # noqa: E402
from smoothprof.schedule import spread_steps  # noqa: E402
from smoothprof.trajectory import read_trajectory  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Random sequences of 16 tokens from a vocabulary of 64, their own labels (causal LM)."""

    def __init__(self, count=64):
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (count, 16), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2():
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2
    )  # dropout 0.1 everywhere: what a probe could disturb
    return transformers.GPT2LMHeadModel(config)


def make_trainer(tmp_path, *, max_steps=8, **options):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args = transformers.TrainingArguments(**{**defaults, **options})
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())


def training_log(trainer):
    return [
        entry["loss"]
        for entry in trainer.state.log_history
        if "loss" in entry and not any(key.startswith("smoothprof/") for key in entry)
    ]


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_accumulation_steps": 2, "max_grad_norm": 0.05}, {"bf16": True}],
    ids=["plain", "accumulate-clip", "bf16"],
)
def test_probing_is_invisible_to_the_training(tmp_path, options):
    plain = make_trainer(tmp_path / "plain", **options)
    plain.train()
    probed = make_trainer(tmp_path / "probed", **options)
    callback = SmoothnessCallback(probed, tmp_path / "run.h5", every=3, probe_batches=2)
    probed.add_callback(callback)
    probed.train()
    assert training_log(plain) == training_log(probed) and len(training_log(plain)) == 8
    for a, b in zip(plain.model.parameters(), probed.model.parameters()):
        assert torch.equal(a, b)
    assert [r.step for r in callback.records] == [0, 3, 6]
    trajectory = read_trajectory(tmp_path / "run.h5")
    assert trajectory.status == "closed" and trajectory.num_probes == 3
    # Under bf16 autocast the probe still measures the float32 model.
    assert trajectory.config["amp"] == ("bf16" if options.get("bf16") else None)
    assert trajectory.config["probe_dtype"] == "float32"
    assert np.isfinite(trajectory.probes["hessian_norm"]).all()
    # The warmup's lr is 0 at step 0: no update, so no finite difference along it.
    fd = trajectory.probes["smoothness_fd"]
    assert math.isnan(fd[0]) and np.isfinite(fd[1:]).all()


def test_the_file_and_the_log_record_how_the_trainer_trained(tmp_path):
    trainer = make_trainer(tmp_path, max_grad_norm=0.5)
    trainer.add_callback(SmoothnessCallback(trainer, tmp_path / "run.h5", num_probes=4))
    trainer.train()
    trajectory = read_trajectory(tmp_path / "run.h5")
    config = trajectory.config
    assert config["optimizer"] == "adamw" and config["lr"] == 3e-3 and config["clip"] == 0.5
    assert config["scheduler"] == "LambdaLR" and config["optimizer_source"] == "trainer"
    assert config["steps"] == 8 and config["probe_batches"] == 4
    assert trajectory.attributes["trainer"].startswith("transformers ")
    assert trajectory.probes["step"].tolist() == list(spread_steps(8, 4)) == [0, 1, 4, 7]
    # One training row per logged step: the Trainer's loss, grad norm and lr.
    logged = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    train = trajectory.train
    assert train["step"].tolist() == list(range(8))
    assert np.allclose(train["loss"], [e["loss"] for e in logged], rtol=1e-12)
    assert np.allclose(train["lr"], [e["learning_rate"] for e in logged], rtol=1e-12)
    assert train["lr"][:3].tolist() == pytest.approx([0, 1.5e-3, 3e-3])  # the lr of each step
    assert np.array_equal(train["clipped"], train["grad_norm"] > 0.5)
    # The probe's values went through trainer.log, at the step after the update.
    probes = {e["step"]: e for e in trainer.state.log_history if "smoothprof/hessian_norm" in e}
    assert sorted(probes) == [1, 2, 5, 8]
    assert probes[5]["smoothprof/hessian_norm"] == trajectory.probes["hessian_norm"][2]
    result = CliRunner().invoke(
        app, ["fit", "--json", "--bootstrap", "0", str(tmp_path / "run.h5")]
    )
    assert result.exit_code == 0, result.output


def test_resuming_from_a_checkpoint_appends_to_the_file(tmp_path):
    path = tmp_path / "run.h5"
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=4)
    first.add_callback(SmoothnessCallback(first, path, every=2, probe_batches=2))
    first.train()
    second = make_trainer(tmp_path, max_steps=12, save_strategy="no")
    second.add_callback(SmoothnessCallback(second, path, every=2, probe_batches=2))
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    trajectory = read_trajectory(path)
    assert trajectory.probes["step"].tolist() == [0, 2, 4, 6, 8, 10]
    assert trajectory.train["step"].tolist() == list(range(12))
    assert trajectory.attributes["resumed_at_steps"] == [4]
    assert trajectory.config["steps"] == 8  # the file's config: as the run began


def test_too_many_probe_batches_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(SmoothnessCallback(trainer, tmp_path / "run.h5", probe_batches=17))
    with pytest.raises(ConfigError, match="the training dataset has 64: ask for at most 16"):
        trainer.train()


def test_the_documented_example_runs(tmp_path, monkeypatch):
    doc = (REPO / "docs" / "trainers.md").read_text()
    section = doc.split("## Hugging Face Trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/trainers.md", "exec"), {"__name__": "example"})
    trajectory = read_trajectory(tmp_path / "gpt2.h5")
    assert trajectory.num_probes > 3 and math.isfinite(trajectory.probes["hessian_norm"][-1])
