"""Models users did not write, through `smoothprof run` and `smoothprof fit`: a GPT-2 from
``transformers`` (the ``models`` extra, installed by scripts/setup.sh), a timm ResNet and
torchvision's MobileNetV3 (the ``vision`` extra: skipped where it is not installed or does not
import, as with a CUDA torchvision next to the CPU torch)."""

import importlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.trajectory import read_trajectory

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
SAMPLES = REPO / "sample_models"


def require(module_name):
    """Skip unless ``module_name`` imports; a broken install (not only a missing one) skips."""
    try:
        importlib.import_module(module_name)
    except Exception as error:
        pytest.skip(f"{module_name} does not import: {type(error).__name__}: {error}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread on a shared two-core machine; the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, *options):
    out = tmp_path / f"{name}.h5"
    result = runner.invoke(
        app, ["run", str(SAMPLES / name), "-o", str(out), *options], env={"COLUMNS": "100"}
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def fit_json(path):
    result = runner.invoke(app, ["fit", "--json", str(path)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.output)
    assert fitted["L0"] >= 0 and fitted["L1"] >= 0 and fitted["L0"] + fitted["L1"] > 0
    assert fitted["step_size"] > 0
    return fitted


def check_probes(trajectory, steps):
    assert trajectory.probes["step"].tolist() == steps
    for column in ("loss", "grad_norm", "hessian_norm", "smoothness_fd"):
        assert np.isfinite(trajectory.probes[column]).all(), column
    assert trajectory.probes["hessian_converged"].all()
    assert (trajectory.probes["hvp_count"] > 0).all()


def test_gpt2_at_the_tools_defaults_probes_and_fits(tmp_path):
    """Only --steps is given: the default schedule (every step of so short a run), one probe
    batch (few parameters, but a large graph per batch) of dict batches whose loss GPT-2
    computes itself, its graph retained, Adam from the file's defaults."""
    require("transformers")
    out, output = run(tmp_path, "gpt2_bytes.py", "--steps", "3")
    assert "118,528 parameters" in output
    assert "on 1 batch (chosen for the model's size: 118,528 parameters, 17." in output
    trajectory = read_trajectory(out)
    assert trajectory.config["probe_schedule"] == "auto"
    assert trajectory.config["probe_batches"] == 1
    assert trajectory.config["probe_graph_bytes"] > 4 * 2**20
    assert trajectory.attributes["hvp_method"] == "retained"
    check_probes(trajectory, [0, 1, 2])
    # Chance over 256 byte values at the initialization; the Adam steps lower the loss.
    assert abs(trajectory.probes["loss"][0] - math.log(256)) < 0.3
    assert trajectory.probes["loss"][-1] < trajectory.probes["loss"][0]
    # Adam's preconditioner exists from the first update on.
    assert np.isfinite(trajectory.probes["preconditioned_sharpness"][1:]).all()
    fit_json(out)


def _import_sample(name):
    spec = importlib.util.spec_from_file_location(f"sample_{name}", SAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt2_schedule_is_a_warmup_then_a_cosine(monkeypatch):
    require("transformers")
    monkeypatch.syspath_prepend(str(SAMPLES))
    adamw = _import_sample("gpt2_bytes_adamw")
    factors = [adamw.lr_factor(step) for step in range(adamw.TOTAL_STEPS + 50)]
    warmup = factors[: adamw.WARMUP_STEPS]
    assert np.allclose(warmup, np.arange(1, adamw.WARMUP_STEPS + 1) / adamw.WARMUP_STEPS)
    cosine = factors[adamw.WARMUP_STEPS - 1 :]
    assert (np.diff(cosine) <= 0).all()
    middle = (adamw.WARMUP_STEPS + adamw.TOTAL_STEPS) // 2
    assert factors[middle] == pytest.approx(0.55, abs=0.01)  # halfway down from 1 to 0.1
    assert factors[adamw.TOTAL_STEPS :] == [adamw.FINAL_FRACTION] * 50


def test_gpt2_with_adamw_and_a_warmup_cosine_schedule(tmp_path, monkeypatch):
    require("transformers")
    out, _ = run(
        tmp_path, "gpt2_bytes_adamw.py", "--steps", "6", "--num-probes", "3", "--probe-batches", "2"
    )
    trajectory = read_trajectory(out)
    assert trajectory.config["optimizer_source"] == "model file"
    assert trajectory.config["scheduler"] == "LambdaLR"
    monkeypatch.syspath_prepend(str(SAMPLES))
    adamw = _import_sample("gpt2_bytes_adamw")
    expected = [adamw.PEAK_LR * adamw.lr_factor(step) for step in range(6)]
    assert np.allclose(trajectory.train["lr"], expected, rtol=1e-6)
    check_probes(trajectory, [0, 1, 5])
    fit_json(out)


@pytest.mark.parametrize(
    "name, module_name", [("timm_resnet.py", "timm"), ("mobilenet_small.py", "torchvision")]
)
def test_vision_models_run_a_few_steps_and_fit(tmp_path, name, module_name):
    require(module_name)
    out, _ = run(tmp_path, name, "--steps", "3", "--num-probes", "3", "--probe-batches", "1")
    check_probes(read_trajectory(out), [0, 1, 2])
    fit_json(out)
