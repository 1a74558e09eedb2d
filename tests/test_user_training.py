"""Training as users train: the model file's optimizer() and scheduler(), --amp and --accumulate.

The probe stays invisible under each of them (bit-identical training on the CPU with and without
probes), and the trajectory's config says how the run trained."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import ASSETS, REPO
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.loading import ModelFileError, load_model_file
from smoothprof.train import RunConfig, prepare_run, train
from smoothprof.trajectory import TrajectoryWriter, read_trajectory

pytestmark = pytest.mark.usefixtures("clean_sys_path")

# Batch norm and dropout (what a probe could disturb), AdamW with weight decay, warmup + cosine.
NOISY_ADAMW = """
import math
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(16, 3))

def dataloader():
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                       shuffle=True)

def optimizer(parameters):
    return torch.optim.AdamW(parameters, lr=0.02, weight_decay=0.1)

def scheduler(optimizer):
    warmup = lambda step: min(1.0, (step + 1) / 4)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / 20)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup(step) * cosine(step))
"""


def run_file(path, output, **options):
    """Prepare and train ``path`` with ``options``; the result, the model and the file."""
    spec = load_model_file(path)
    config = RunConfig.from_options({}, {"steps": 12, "max_overhead": math.inf, **options})
    prepared = prepare_run(spec, config)
    attributes = {"config": prepared.recorded_config()}
    with TrajectoryWriter(output, attributes=attributes) as writer:
        result = train(prepared, on_probe=writer.append_probe, on_train_row=writer.append_train)
    return result, prepared, read_trajectory(output)


def test_adamw_with_warmup_and_cosine_from_the_model_file(tmp_path):
    module = load_model_file(ASSETS / "good_adamw_cosine.py").module
    result, prepared, trajectory = run_file(
        ASSETS / "good_adamw_cosine.py", tmp_path / "adamw.h5", probe_every=3
    )
    assert type(prepared.optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in prepared.optimizer.param_groups] == [0.05, 0.0]
    # train/lr is the lr each step was taken with: the schedule's, from its first step on.
    expected = [0.01 * module.lr_factor(step) for step in range(12)]
    assert np.allclose(trajectory.train["lr"], expected, rtol=1e-12, atol=0)
    assert trajectory.train["lr"][0] == pytest.approx(0.002) and trajectory.train["lr"][4] == 0.01
    config = trajectory.config
    assert config["optimizer"] == "adamw" and config["lr"] == 0.01
    assert config["optimizer_source"] == "model file" and config["scheduler"] == "LambdaLR"
    assert config["optimizer_settings"]["betas"] == [0.9, 0.999]
    assert config["optimizer_settings"]["weight_decay"] == 0.05  # param group 0's
    assert "lr" not in config["optimizer_settings"]  # the lr is the config's, before the schedule
    assert config["momentum"] is None
    # The finite difference is along the update AdamW made, at every probe.
    assert trajectory.num_probes == 4 and np.isfinite(trajectory.probes["smoothness_fd"]).all()
    assert not trajectory.train["skipped"].any() and result.steps_skipped == 0


def test_a_scheduler_alone_steps_the_options_optimizer(tmp_path):
    _, prepared, trajectory = run_file(
        ASSETS / "good_scheduler_only.py", tmp_path / "s.h5", optimizer="momentum", lr=0.4,
        probe_every=0,
    )  # fmt: skip
    assert type(prepared.optimizer) is torch.optim.SGD
    assert prepared.optimizer.param_groups[0]["momentum"] == 0.9
    assert trajectory.train["lr"].tolist() == [0.4 * 0.5 ** (step // 3) for step in range(12)]
    config = trajectory.config
    assert config["optimizer"] == "momentum" and config["lr"] == 0.4
    assert config["optimizer_source"] == "options" and config["scheduler"] == "StepLR"


INVISIBLE_UNDER = {
    "adamw_and_schedule": {},
    "accumulate": {"accumulate": 3},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
}


@pytest.mark.parametrize("options", INVISIBLE_UNDER.values(), ids=INVISIBLE_UNDER)
def test_probing_every_step_changes_nothing(tmp_path, options):
    (tmp_path / "noisy_adamw.py").write_text(NOISY_ADAMW)
    runs = {}
    for label, every in (("probed", 1), ("plain", 0)):
        runs[label] = run_file(
            tmp_path / "noisy_adamw.py", tmp_path / f"{label}.h5", probe_every=every,
            probe_batches=2, **options,
        )  # fmt: skip
    (probed_result, probed_run, probed), (_, plain_run, plain) = runs["probed"], runs["plain"]
    assert probed.num_probes == 12 and plain.num_probes == 0
    for column in ("loss", "grad_norm", "lr", "skipped"):
        assert np.array_equal(probed.train[column], plain.train[column]), column
    for a, b in zip(
        probed_run.model.state_dict().values(), plain_run.model.state_dict().values()
    ):
        assert torch.equal(a, b)
    assert probed_run.optimizer.state_dict()["state"].keys()
    for key, state in probed_run.optimizer.state_dict()["state"].items():
        other = plain_run.optimizer.state_dict()["state"][key]
        assert all(torch.equal(state[name], other[name]) for name in state)
    # A step the fp16 GradScaler skipped made no update: its probe has no finite difference.
    skipped = probed.train["skipped"].astype(bool)
    assert np.array_equal(np.isnan(probed.probes["smoothness_fd"]), skipped)
    assert probed_result.steps_skipped == skipped.sum()


def test_bf16_trains_under_autocast_and_the_probe_measures_in_float32(tmp_path):
    (tmp_path / "noisy_adamw.py").write_text(NOISY_ADAMW)
    runs = {
        amp: run_file(tmp_path / "noisy_adamw.py", tmp_path / f"{amp}.h5", amp=amp, probe_every=4)
        for amp in ("bf16", None)
    }
    (_, _, bf16), (_, _, fp32) = runs["bf16"], runs[None]
    # The first probe measures the same parameters on the same batches: the same float32 value.
    assert bf16.probes["loss"][0] == fp32.probes["loss"][0]
    assert bf16.probes["grad_norm"][0] == fp32.probes["grad_norm"][0]
    # Training itself ran in bfloat16: its first loss is not float32's.
    assert bf16.train["loss"][0] != fp32.train["loss"][0]
    assert bf16.train["loss"][0] == pytest.approx(fp32.train["loss"][0], rel=0.05)
    assert np.isfinite(bf16.train["loss"]).all() and np.isfinite(bf16.probes["hessian_norm"]).all()
    config = bf16.config
    assert config["amp"] == "bf16" and config["probe_autocast"] is False
    assert config["probe_dtype"] == "float32"


OVERFLOWING = """
import torch

def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4)

def dataloader():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    return [(x[:16], x[:16].flip(1)), (x[16:], x[16:].flip(1))]

def loss(model, batch):  # a large loss: its fp16 gradient overflows at GradScaler's first scale
    x, y = batch
    return 100.0 * ((model(x) - y) ** 2).mean()

def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
"""


def test_fp16_steps_that_overflow_are_skipped_and_recorded(tmp_path):
    (tmp_path / "overflowing.py").write_text(OVERFLOWING)
    result, prepared, trajectory = run_file(
        tmp_path / "overflowing.py", tmp_path / "fp16.h5", amp="fp16", lr=0.001, probe_every=1
    )
    skipped = trajectory.train["skipped"].astype(bool)
    assert skipped[0] and not skipped.all() and result.steps_skipped == skipped.sum()
    assert result.diverged_at is None and result.steps_done == 12
    assert not np.isfinite(trajectory.train["grad_norm"][skipped]).any()  # inf or NaN
    assert np.isfinite(trajectory.train["grad_norm"][~skipped]).all()
    assert np.isnan(trajectory.probes["smoothness_fd"][skipped]).all()
    assert np.isfinite(trajectory.probes["smoothness_fd"][~skipped]).all()
    # A skipped step moves nothing: the probes before and after it see the same loss.
    first_update = int(np.argmin(skipped))
    assert len(set(trajectory.probes["loss"][: first_update + 1])) == 1
    assert prepared.scaler.get_scale() < 65536.0
    # Nor does it step the schedule: the lr falls after the steps that updated only.
    lr = trajectory.train["lr"]
    assert np.allclose(lr[1:], lr[:-1] * np.where(skipped[:-1], 1.0, 0.9), rtol=1e-12)


def test_the_run_says_how_it_trains(tmp_path):
    result = CliRunner().invoke(app, [
        "run", str(ASSETS / "good_minimal.py"), "-o", str(tmp_path / "x.h5"), "--steps", "4",
        "--amp", "bf16", "--accumulate", "2",
    ], env={"COLUMNS": "100"})  # fmt: skip
    assert result.exit_code == 0, result.output
    header = " ".join(result.stderr.split())
    said = "4 steps of sgd at lr 0.1, bf16 autocast (the probe measures in float32), 2 batches"
    assert f"{said} per step" in header, header
    config = read_trajectory(tmp_path / "x.h5").config
    assert (config["amp"], config["accumulate"], config["probe_dtype"]) == ("bf16", 2, "float32")


ACCUMULATED = """
import torch

BATCH_SIZE = {batch_size}

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    return x, (x @ torch.randn(5, 3, generator=g)).argmax(dim=1)

def dataloader():
    x, y = data()
    return [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, 48, BATCH_SIZE)]

def probe_batches():  # the same for both batch sizes
    x, y = data()
    return [(x[:16], y[:16])]
"""


def test_accumulating_k_batches_makes_one_step_of_their_mean_gradient(tmp_path):
    for size in (8, 24):
        (tmp_path / f"batch{size}.py").write_text(ACCUMULATED.format(batch_size=size))
    accumulated = run_file(
        tmp_path / "batch8.py", tmp_path / "k3.h5", accumulate=3, lr=0.3, steps=6, probe_every=2
    )
    whole = run_file(tmp_path / "batch24.py", tmp_path / "k1.h5", lr=0.3, steps=6, probe_every=2)
    (_, prepared, trajectory), (_, whole_run, whole_trajectory) = accumulated, whole
    assert trajectory.train["step"].tolist() == list(range(6))  # --steps counts optimizer steps
    # Three batches of 8 per step are one batch of 24: the same loss, gradient and update.
    for column in ("loss", "grad_norm"):
        assert np.allclose(trajectory.train[column], whole_trajectory.train[column], rtol=1e-5)
    for a, b in zip(prepared.model.parameters(), whole_run.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # The probe objective does not depend on --accumulate: the same probes.
    assert np.allclose(trajectory.probes["loss"], whole_trajectory.probes["loss"], rtol=1e-5)
    assert np.isfinite(trajectory.probes["smoothness_fd"]).all()
    assert trajectory.config["accumulate"] == 3


@pytest.mark.parametrize(
    "name, expected",
    [
        ("broken_optimizer_not_optimizer.py", "optimizer(parameters) returned a dict, not a "
         "torch.optim.Optimizer"),
        ("broken_optimizer_raises.py", "optimizer(parameters) raised TypeError: "),
        ("broken_optimizer_foreign_params.py", "over tensors that are not the model's trainable"),
        ("broken_scheduler_not_scheduler.py", "scheduler(optimizer) returned a float, not an LR "
         "scheduler"),
        ("broken_scheduler_raises.py", "scheduler(optimizer) raised TypeError: "),
        ("broken_scheduler_other_optimizer.py", "a scheduler of another optimizer"),
    ],
)  # fmt: skip
def test_broken_optimizers_and_schedulers_give_one_line(tmp_path, name, expected):
    spec = load_model_file(ASSETS / name)
    with pytest.raises(ModelFileError) as info:
        prepare_run(spec, RunConfig(steps=2))
    message = str(info.value)
    assert expected in message and name in message and "\n" not in message
    result = CliRunner().invoke(
        app, ["run", str(ASSETS / name), "-o", str(tmp_path / "x.h5"), "--steps", "2"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: {message}"]
    assert not (tmp_path / "x.h5").exists()


def test_defaults_cannot_set_what_optimizer_decides():
    with pytest.raises(ModelFileError) as info:
        load_model_file(ASSETS / "broken_optimizer_and_defaults_lr.py")
    assert "defaults sets lr, which optimizer(parameters) decides" in str(info.value)


@pytest.mark.parametrize(
    "options, flags",
    [
        (["--optimizer", "adam"], "--optimizer does"),
        (["--lr", "0.1"], "--lr does"),
        (["--optimizer", "sgd", "--lr", "0.1"], "--optimizer and --lr do"),
    ],
)
def test_options_that_the_files_optimizer_decides_are_usage_errors(tmp_path, options, flags):
    result = CliRunner().invoke(
        app, ["run", str(ASSETS / "good_adamw_cosine.py"), "-o", str(tmp_path / "x.h5"), *options]
    )
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())  # unwrapped from rich's box
    assert f"{flags} not apply: good_adamw_cosine.py defines optimizer(parameters)" in said
    assert not (tmp_path / "x.h5").exists()


def test_bad_amp_and_accumulate_are_usage_errors(tmp_path):
    for options in (["--amp", "fp8"], ["--accumulate", "0"]):
        result = CliRunner().invoke(
            app, ["run", str(ASSETS / "good_minimal.py"), "-o", str(tmp_path / "x.h5"), *options]
        )
        assert result.exit_code == 2, result.output
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16"):
        RunConfig(amp="fp8").validate()


def test_the_readme_model_file_runs_and_fits(tmp_path, monkeypatch):
    """README's "Your own optimizer and schedule", as written, through `run` and `fit`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own optimizer and schedule", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    (tmp_path / "adamw_cosine.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    runner, env = CliRunner(), {"COLUMNS": "100"}
    run = runner.invoke(app, ["run", "adamw_cosine.py", "--num-probes", "12"], env=env)
    assert run.exit_code == 0, run.output
    assert "300 steps of AdamW (model file) at lr 0.003 with LambdaLR" in run.stderr
    trajectory = read_trajectory(tmp_path / "adamw_cosine.h5")
    lr = trajectory.train["lr"]
    assert lr[0] == pytest.approx(1e-4) and lr[29] == pytest.approx(3e-3)
    assert lr[-1] < 1e-6 and np.all(np.diff(lr[29:]) <= 0)  # warmup, then the cosine decays
    assert trajectory.config["optimizer"] == "adamw" and trajectory.config["lr"] == 0.003
    assert trajectory.train["loss"][-20:].mean() < 0.5 * trajectory.train["loss"][:20].mean()
    fit = runner.invoke(app, ["fit", "adamw_cosine.h5", "--bootstrap", "20"], env=env)
    assert fit.exit_code == 0, fit.output
    said = " ".join(fit.stdout.replace("│", " ").split())
    assert "smoothprof run" not in said  # --lr does not reach the file's optimizer()
    if "The step is measured" in said:  # the step-size search's: AdamW at the lr it found
        assert "adamw at lr" in said and "keep your adamw optimizer" in said
        assert "torch.optim.SGD" not in said
    elif "clip at c = L0/L1" in said:  # the measured headline: AdamW at its own lr
        assert "adamw at its lr 0.003" in said and "keep your adamw optimizer" in said
        assert "in the model file's optimizer() with --clip" in said
        assert "torch.optim.SGD" not in said
    else:  # L1 = 0 here: the fixed step 1/L_max, which is said to be SGD's, not AdamW's
        assert "trained with adamw: the headline is a step size of plain (S)GD" in said
    fit_json = runner.invoke(app, ["fit", "adamw_cosine.h5", "--json"], env=env)
    assert fit_json.exit_code == 0, fit_json.output


def test_the_headline_of_an_adamw_profile_keeps_adamw_and_its_lr():
    from smoothprof.fit import fit_envelope
    from smoothprof.recommend import ProfilingRun, pytorch_snippet, recommend

    fit = fit_envelope([0.2, 0.5, 1.0, 2.0], [1.2, 1.5, 2.0, 3.0], num_bootstrap=0)
    profile = ProfilingRun(lr=0.003, optimizer="adamw", optimizer_from_file=True)
    recs = recommend(fit, profile=profile)
    assert recs.headline.step_size == 0.003 and recs.own_optimizer == "adamw"
    assert "adamw at its lr 0.003" in recs.explanation and "not an SGD step size" in (
        recs.explanation
    )
    assert "in the model file's optimizer() with --clip" in recs.explanation
    assert any("keeps its lr for adamw, not as an SGD step size" in w for w in recs.warnings)
    snippet = pytorch_snippet(recs.headline, own_optimizer=recs.own_optimizer)
    assert "torch.optim" not in snippet and "# keep your adamw optimizer" in snippet
    assert "clip_grad_norm_(model.parameters(), max_norm=1" in snippet
    flat = fit_envelope([0.2, 0.5, 1.0, 2.0], [2.0, 1.9, 2.0, 1.8], num_bootstrap=0)
    unclipped = recommend(flat, profile=profile)
    assert unclipped.own_optimizer is None  # L1 = 0: the fixed step, said to be SGD's
    assert any("not an lr for adamw" in w for w in unclipped.warnings)
    # An SGD profile's headline is unchanged: 5 times its lr, for SGD.
    sgd = recommend(fit, profile=ProfilingRun(lr=0.1, optimizer="sgd"))
    assert sgd.own_optimizer is None and sgd.headline.step_size == pytest.approx(0.5)


def test_accumulation_in_two_processes_averages_the_same_gradient(tmp_path):
    """Under torchrun the ranks sync their gradients at each step's last batch only: 2 ranks x
    2 batches of 8 make the same steps as 2 ranks x 1 batch of 16 over the same rows."""
    from test_distributed import torchrun

    template = ACCUMULATED.replace("48", "64")
    finals = {}
    for size, accumulate in ((8, "2"), (16, "1")):
        (tmp_path / f"batch{size}.py").write_text(template.format(batch_size=size))
        cwd = tmp_path / f"run{size}"
        cwd.mkdir()
        done = torchrun(
            2, "-m", "smoothprof", "run", tmp_path / f"batch{size}.py", "-o", "traj.h5",
            "--accumulate", accumulate, "--steps", "6", "--lr", "0.3", "--probe-every", "2",
            "--device", "cpu", "--save-model", "final.pt", cwd=cwd,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        finals[size] = (read_trajectory(cwd / "traj.h5"), torch.load(cwd / "final.pt"))
    (accumulated, accumulated_state), (whole, whole_state) = finals[8], finals[16]
    assert accumulated.config["accumulate"] == 2 and accumulated.config["world_size"] == 2
    for column in ("loss", "grad_norm"):
        assert np.allclose(accumulated.train[column], whole.train[column], rtol=1e-5)
    for name in whole_state:
        assert torch.allclose(accumulated_state[name], whole_state[name], rtol=1e-5, atol=1e-6)


PLATEAU = """
import torch
from good_minimal import dataloader, model  # noqa: F401

def scheduler(optimizer):  # a metric-driven schedule: smoothprof passes the step's loss
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0,
                                                      threshold=0.0)
"""


def test_reduce_lr_on_plateau_gets_the_steps_loss(tmp_path):
    (tmp_path / "plateau.py").write_text(PLATEAU)
    (tmp_path / "good_minimal.py").write_text((ASSETS / "good_minimal.py").read_text())
    _, _, trajectory = run_file(tmp_path / "plateau.py", tmp_path / "p.h5", lr=2.0, steps=12)
    # The lr halves after each step whose loss is no lower than every earlier step's.
    expected, best = [2.0], math.inf
    for loss in trajectory.train["loss"][:-1]:
        expected.append(expected[-1] if loss < best else expected[-1] / 2)
        best = min(best, loss)
    assert trajectory.train["lr"].tolist() == expected
    assert expected[-1] < 2.0  # the loss did not fall at every step: the schedule acted


def test_a_files_sgd_with_momentum_is_named_as_the_options_name_it(tmp_path):
    (tmp_path / "good_minimal.py").write_text((ASSETS / "good_minimal.py").read_text())
    for momentum, name in ((0.9, "momentum"), (0.0, "sgd")):
        (tmp_path / "sgd.py").write_text(
            "import torch\nfrom good_minimal import dataloader, model  # noqa: F401\n\n"
            "def optimizer(parameters):\n"
            f"    return torch.optim.SGD(parameters, lr=0.2, momentum={momentum})\n"
        )
        _, _, trajectory = run_file(tmp_path / "sgd.py", tmp_path / f"{name}.h5", steps=2)
        config = trajectory.config
        assert (config["optimizer"], config["lr"], config["momentum"]) == (name, 0.2, momentum)
