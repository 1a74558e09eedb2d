"""The training loop: probing is invisible, divergence stops cleanly, options are checked."""

import math

import numpy as np
import pytest
import torch
from conftest import ASSETS

from smoothprof.loading import ModelFileError, load_model_file
from smoothprof.train import ConfigError, RunConfig, prepare_run, train
from smoothprof.trajectory import TrajectoryWriter, read_trajectory

pytestmark = pytest.mark.usefixtures("clean_sys_path")

NOISY_MODEL = """
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
"""


def _train(tmp_path, name, **options):
    model_path = tmp_path / "noisy.py"
    model_path.write_text(NOISY_MODEL)
    spec = load_model_file(model_path)
    config = RunConfig.from_options(
        {}, {"steps": 12, "lr": 0.1, "max_overhead": math.inf, **options}
    )
    prepared = prepare_run(spec, config)
    with TrajectoryWriter(tmp_path / f"{name}.h5") as writer:
        result = train(prepared, on_probe=writer.append_probe, on_train_row=writer.append_train)
    return result, prepared.model, read_trajectory(tmp_path / f"{name}.h5")


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_probing_every_step_changes_nothing(tmp_path, optimizer):
    _, _, plain = _train(tmp_path, "plain", probe_every=0, optimizer=optimizer)
    result, probed_model, probed = _train(
        tmp_path, "probed", probe_every=1, optimizer=optimizer, probe_batches=2, clip=1.0
    )
    _, clipped_model, clipped = _train(
        tmp_path, "clipped", probe_every=0, optimizer=optimizer, clip=1.0
    )
    assert probed.num_probes == 12 and plain.num_probes == 0
    assert np.array_equal(probed.train["loss"], clipped.train["loss"])
    for a, b in zip(probed_model.state_dict().values(), clipped_model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(r.hessian_converged for r in result.probes)
    assert np.isfinite(probed.probes["smoothness_fd"]).all()


EXPLODING_MODEL = """
import torch

def model():
    return torch.nn.Linear(4, 1)

def dataloader():
    x = torch.randn(32, 4)
    return [(x, x.sum(1, keepdim=True))]

def loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
"""


def test_divergence_stops_and_keeps_rows(tmp_path):
    (tmp_path / "exploding.py").write_text(EXPLODING_MODEL)
    spec = load_model_file(tmp_path / "exploding.py")
    config = RunConfig.from_options({}, {"steps": 200, "lr": 10.0, "probe_every": 1})
    with TrajectoryWriter(tmp_path / "diverged.h5") as writer:
        result = train(
            prepare_run(spec, config),
            on_probe=writer.append_probe,
            on_train_row=writer.append_train,
        )
    trajectory = read_trajectory(tmp_path / "diverged.h5")
    assert result.diverged
    assert result.steps_done == result.diverged_at + 1 < 200
    assert len(trajectory.train["step"]) == result.steps_done
    assert not math.isfinite(trajectory.train["loss"][-1]) or not math.isfinite(
        trajectory.train["grad_norm"][-1]
    )


def test_third_party_file_trains(tmp_path):
    spec = load_model_file(ASSETS / "third_party.py")
    config = RunConfig.from_options(spec.defaults, {"steps": 10})
    assert config.optimizer == "momentum" and config.clip == 5.0 and config.seed == 7
    result = train(prepare_run(spec, config))
    assert result.steps_done == 10 and len(result.probes) == 1


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"clip": 0.0}, "clip must be positive"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"estimators": ("hvp", "magic")}, "unknown estimator"),
        ({"fd_points": (0.0,)}, "fd_points"),
        ({"hvp_method": "retained", "probe_batches": 2}, "allow it with retain_graphs"),
        ({"hvp_method": "retained", "probe_batches": 1, "retain_graphs": False}, "retain_graphs"),
    ],
)
def test_bad_options(options, expected):
    with pytest.raises(ConfigError, match=expected):
        RunConfig.from_options({}, options)


def test_retained_hvps_with_the_graphs_allowed_or_one_batch():
    RunConfig.from_options({}, {"hvp_method": "retained", "retain_graphs": True})
    RunConfig.from_options({}, {"hvp_method": "retained", "probe_batches": 1})


def test_unknown_defaults_key():
    spec = load_model_file(ASSETS / "broken_defaults_bad_key.py")
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig.from_options(spec.defaults, {})


def test_cli_runs_with_and_without_probes_are_bit_for_bit_equal(tmp_path):
    """The acceptance test of invisibility, through the command line: BatchNorm and dropout,
    probes every step (all three estimators) against --probe-every 0."""
    from typer.testing import CliRunner

    from smoothprof.cli import app

    (tmp_path / "noisy.py").write_text(NOISY_MODEL)
    runner = CliRunner()
    outputs = {}
    for label, every in (("probed", "1"), ("plain", "0")):
        out = tmp_path / f"{label}.h5"
        result = runner.invoke(app, [
            "run", str(tmp_path / "noisy.py"), "-o", str(out), "--steps", "15",
            "--optimizer", "adam", "--lr", "0.01", "--probe-every", every, "--probe-batches", "2",
            "--max-overhead", "inf", "--save-model", str(out.with_suffix(".pt")),
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[label] = (
            read_trajectory(out),
            torch.load(out.with_suffix(".pt"), weights_only=True),
        )
    (probed, probed_state), (plain, plain_state) = outputs["probed"], outputs["plain"]
    assert probed.num_probes == 15 and plain.num_probes == 0
    assert np.isfinite(probed.probes["preconditioned_sharpness"][1:]).all()  # Adam's, too
    assert np.array_equal(probed.train["loss"], plain.train["loss"])
    assert np.array_equal(probed.train["grad_norm"], plain.train["grad_norm"])
    assert probed_state.keys() == plain_state.keys()
    for key in probed_state:
        assert torch.equal(probed_state[key], plain_state[key]), key


# --- dataloader() must be re-iterable: every pass over the data iterates it again ----------

DATALOADERS = {
    "a_generator": """
def dataloader():
    for i in range(0, 32, 8):
        yield X[i : i + 8], Y[i : i + 8]
""",
    "an_own_iterator": """
class Batches:  # its own iterator, never rewound: one pass only
    def __init__(self):
        self.i = 0
    def __iter__(self):
        return self
    def __next__(self):
        if self.i >= 32:
            raise StopIteration
        self.i += 8
        return X[self.i - 8 : self.i], Y[self.i - 8 : self.i]

def dataloader():
    return Batches()
""",
    "a_rewinding_iterator": """
class Batches:  # its own iterator, rewound by __iter__: every pass works
    def __iter__(self):
        self.i = 0
        return self
    def __next__(self):
        if self.i >= 32:
            raise StopIteration
        self.i += 8
        return X[self.i - 8 : self.i], Y[self.i - 8 : self.i]

def dataloader():
    return Batches()
""",
    "a_class_with_iter": """
class Batches:
    def __iter__(self):
        for i in range(0, 32, 8):
            yield X[i : i + 8], Y[i : i + 8]

def dataloader():
    return Batches()
""",
    "a_list": """
def dataloader():
    return [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 32, 8)]
""",
    "a_dataloader": """
def dataloader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
""",
    "an_endless_generator": """
def dataloader():
    while True:
        yield X[:8], Y[:8]
""",
}
ONE_SHOT = {"a_generator": "a generator", "an_own_iterator": "Batches"}


@pytest.mark.parametrize("kind", sorted(DATALOADERS))
def test_a_one_shot_dataloader_is_named_at_its_second_pass(tmp_path, kind):
    path = tmp_path / f"{kind}.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\nX = torch.randn(32, 4)\n"
        "Y = torch.randint(0, 3, (32,))\n\ndef model():\n    return nn.Linear(4, 3)\n"
        + DATALOADERS[kind]
    )
    spec = load_model_file(path)
    prepared = prepare_run(spec, RunConfig(steps=10, probe_every=0))
    if kind not in ONE_SHOT:
        assert train(prepared).steps_done == 10
        return
    with pytest.raises(ModelFileError) as info:
        train(prepared)
    assert str(info.value) == (
        f"{path}: dataloader() returned a one-shot iterator ({ONE_SHOT[kind]}), which cannot "
        "be iterated twice; it was exhausted after 4 batches at step 4; return a re-iterable "
        "(a DataLoader, a list, or a class with __iter__) instead"
    )


WIDE_MODEL = """
import torch
from torch import nn

def model():
    return nn.Linear(WIDTH, 3)

def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, WIDTH, generator=g)
    return [(x[i : i + 8], torch.randint(0, 3, (8,), generator=g)) for i in range(0, 64, 8)]
"""


@pytest.mark.parametrize(
    ("width", "given", "expected", "by_size"),
    [(100, None, 4, True), (400_000, None, 1, True), (400_000, 3, 3, False)],
)
def test_probe_batches_by_the_models_size_unless_given(tmp_path, width, given, expected, by_size):
    path = tmp_path / "wide.py"
    path.write_text(WIDE_MODEL.replace("WIDTH", str(width)))
    spec = load_model_file(path)
    prepared = prepare_run(spec, RunConfig.from_options({}, {"probe_batches": given}))
    assert prepared.config.probe_batches == expected == len(prepared.probe_batches)
    assert prepared.probe_batches_by_size is by_size
    assert prepared.recorded_config()["probe_batches_by_size"] is by_size
    # chosen batches keep their graphs (the cheapest HVPs); several given ones do not by default
    assert prepared.config.retain_graphs is (True if by_size else None)
    if by_size:  # the graph of one batch of 8 rows is counted, not estimated
        graph = prepared.recorded_config()["probe_graph_bytes"]
        assert 8 * width * 4 <= graph < 8 * width * 4 * 10


def test_default_probe_batches_follow_parameters_and_graph_size():
    from smoothprof.train import default_probe_batches

    mib = 2**20
    sizes = [(10, 0), (999_999, 4 * mib), (10**6, 0), (10**8, 0), (10, 4 * mib + 1), (10, 10**9)]
    assert [default_probe_batches(n, b) for n, b in sizes] == [4, 4, 1, 1, 1, 1]


TALL_MODEL = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3))

def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8192, 4, generator=g)
    y = torch.randint(0, 3, (32, 8192), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]

def loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
"""


def test_a_small_model_with_large_activations_gets_one_probe_batch(tmp_path):
    """Few parameters, many activations (a GPT-2 of 118k parameters holds 17 MiB of graph per
    batch of 16 x 32 tokens): one batch, and the run's header says why."""
    path = tmp_path / "tall.py"
    path.write_text(TALL_MODEL)
    prepared = prepare_run(load_model_file(path), RunConfig.from_options({}, {}))
    choice = prepared.probe_batches_choice
    assert choice is not None and choice.batches == 1 == len(prepared.probe_batches)
    assert choice.num_parameters == 4 * 64 + 64 + 64 * 3 + 3
    assert choice.graph_bytes > 8 * 8192 * 64 * 4 > 4 * 2**20  # the tanh's output alone
    assert prepared.config.retain_graphs is True
    assert choice.describe() == (
        f"chosen for the model's size: 515 parameters, {choice.graph_bytes / 2**20:.3g} MiB of "
        "graph per batch; --probe-batches sets it"
    )
