"""Every sample model runs a few steps through `smoothprof run`, and its data is what it says."""

import ast
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.loading import load_model_file
from smoothprof.train import RunConfig
from smoothprof.trajectory import read_trajectory

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
SAMPLES = REPO / "sample_models"
# A few steps each; the LSTM's and the CNN's probes are the costly part, so they probe twice, and
# the LSTM skips timing the HVP methods (forward-over-reverse fails slowly for CPU LSTMs).
FEW_STEPS = {
    "linear_rnn.py": [],
    "mlp_spirals.py": [],
    "char_lstm.py": [
        *("--probe-schedule", "every", "--probe-every", "4"),
        *("--hvp-method", "double-backward"),
    ],
    "resnet_digits.py": ["--probe-schedule", "every", "--probe-every", "4"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine two threads can wait on each other for
    a long time in the Hessian-vector products; the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _import(name):
    spec = importlib.util.spec_from_file_location(f"sample_{name}", SAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Samples that need an optional extra; tests/test_real_models.py runs them where it is installed.
WITH_EXTRAS = {
    "gpt2_bytes.py": "transformers",
    "gpt2_bytes_adamw.py": "transformers",
    "timm_resnet.py": "timm",
    "mobilenet_small.py": "torchvision",
}


def test_every_sample_is_documented_and_listed():
    readme = (SAMPLES / "README.md").read_text()
    assert sorted(p.name for p in SAMPLES.glob("*.py")) == sorted([*FEW_STEPS, *WITH_EXTRAS])
    for name, extra in WITH_EXTRAS.items():  # documented without importing what they need
        docstring = ast.get_docstring(ast.parse((SAMPLES / name).read_text())) or ""
        assert len(docstring) > 800 and "What to expect" in docstring, name
        assert f"**`{name}`**" in readme and extra in docstring
    for name in FEW_STEPS:
        spec = load_model_file(SAMPLES / name)
        assert len(spec.module.__doc__ or "") > 800, f"{name}: document it at the top"
        assert "What to expect" in spec.module.__doc__
        assert f"**`{name}`**" in readme
        RunConfig.from_options(spec.defaults, {})  # the defaults are valid run options


@pytest.mark.parametrize("name", sorted(FEW_STEPS))
def test_sample_runs_a_few_steps(name, tmp_path):
    out = tmp_path / "run.h5"
    result = runner.invoke(
        app,
        ["run", str(SAMPLES / name), "-o", str(out), "--steps", "5", *FEW_STEPS[name]],
        env={"COLUMNS": "100"},
    )
    assert result.exit_code == 0, result.output
    trajectory = read_trajectory(out)
    assert trajectory.train["step"].tolist() == [0, 1, 2, 3, 4]
    assert np.isfinite(trajectory.train["loss"]).all()
    assert trajectory.num_probes >= 1
    assert np.isfinite(trajectory.probes["grad_norm"]).all()
    assert np.isfinite(trajectory.probes["hessian_norm"]).all()
    assert trajectory.probes["hessian_converged"].all()


@pytest.mark.parametrize("name", ["char_lstm.py", "resnet_digits.py"])
def test_batches_are_tuples_of_tensors_and_the_loss_a_scalar(name):
    spec = load_model_file(SAMPLES / name)
    torch.manual_seed(0)
    batch = next(iter(spec.make_dataloader()))
    assert isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch)
    value = spec.call_loss(spec.make_model(), batch)
    assert isinstance(value, torch.Tensor) and value.ndim == 0 and value.requires_grad
    assert math.isfinite(float(value.detach()))


def test_char_lstm_text_is_fixed_and_degrades_gracefully(monkeypatch, capsys):
    lstm = _import("char_lstm")
    text = lstm._text()
    assert 50_000 < len(text) <= lstm.MAX_CHARS
    assert "def " in text and "import " in text  # Python source
    ids = lstm.encode(text[:1000])
    assert ids.dtype == torch.long and int(ids.max()) < lstm.VOCAB_SIZE
    assert lstm.decode(lstm.encode("def f(x):\n\treturn x")) == "def f(x):\n?return x"
    x, y = next(iter(lstm.dataloader()))
    assert x.shape == y.shape == (lstm.BATCH_SIZE, lstm.SEQ_LEN)
    # y is x shifted by one character: each window is a stretch of the text.
    window = lstm.decode(x[0].tolist()) + lstm.decode(y[0, -1:].tolist())
    assert window[1:] == lstm.decode(y[0].tolist())

    lstm._text.cache_clear()
    monkeypatch.setattr(lstm, "STDLIB_FILES", ("no_such_module_here.py", "textwrap.py"))
    partial = lstm._text()
    assert "no_such_module_here.py" in capsys.readouterr().err and "textwrap" in partial
    lstm._text.cache_clear()
    monkeypatch.setattr(lstm, "STDLIB_FILES", ("no_such_module_here.py",))
    fallback = lstm._text()
    assert "docstrings" in capsys.readouterr().err and len(fallback) > 10_000
    lstm._text.cache_clear()


def test_resnet_digits_data_real_or_synthetic(monkeypatch, capsys):
    digits = _import("resnet_digits")
    images, labels = digits.synthetic_digits(per_class=20)
    assert images.shape == (200, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 16.0
    assert torch.bincount(labels).tolist() == [20] * 10
    means = torch.stack([images[labels == d].mean(0) for d in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(math.inf).min() > 2.0
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in digits.model().modules())

    digits._data.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    x, y = next(iter(digits.dataloader()))
    assert x.shape == (digits.BATCH_SIZE, 1, 8, 8) and y.dtype == torch.long
    assert "synthetic" in capsys.readouterr().err and "synthetic" in digits.data_source()
    digits._data.cache_clear()
    monkeypatch.undo()
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return
    assert digits.data_source().startswith("scikit-learn's 8x8 handwritten digits (1797")
