"""The probe's memory: the estimate's arithmetic, the run's choice of basis and graph, and the
memory-saving probe measuring what the default one measures."""

import math

import pytest
import torch
from conftest import ASSETS
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.loading import load_model_file
from smoothprof.memory import (
    DEFAULT_MAX_BASIS,
    MIN_BASIS,
    RETAINED_MIN_BASIS,
    MemoryFootprint,
    choose_probe_memory,
)
from smoothprof.objective import saved_activation_bytes, saved_graph_bytes
from smoothprof.probe import unchanged_model_state
from smoothprof.train import (
    ConfigError,
    RunConfig,
    count_memory_footprint,
    optimizer_state_vectors,
    prepare_run,
    train,
)

pytestmark = pytest.mark.usefixtures("clean_sys_path")

GIB = 2**30
# A 1B-parameter float32 model with AdamW, batches of 8 x 2048 tokens (sizes of that order).
LARGE = MemoryFootprint(
    vector_bytes=4 * GIB, optimizer_vectors=2, activation_bytes=30 * GIB, graph_bytes=78 * GIB
)
SMALL = MemoryFootprint(
    vector_bytes=20_000, optimizer_vectors=0, activation_bytes=300_000, graph_bytes=700_000
)


def choose(footprint, limit_bytes, **options):
    options.setdefault("hvp_method", "auto")
    return choose_probe_memory(footprint, limit_bytes=limit_bytes, limit="a limit", **options)


def test_training_step_counts_parameters_state_and_activations_or_gradients():
    assert LARGE.training_step_bytes == (1 + 2) * 4 * GIB + 30 * GIB
    assert SMALL.training_step_bytes == 20_000 + 300_000
    few_activations = MemoryFootprint(
        vector_bytes=GIB, optimizer_vectors=1, activation_bytes=GIB // 10, graph_bytes=GIB
    )
    assert few_activations.training_step_bytes == 3 * GIB  # parameters, momentum, gradients


def test_probe_estimate_grows_with_the_basis_and_the_kept_graphs():
    for footprint in (SMALL, LARGE):
        for method in ("auto", "double-backward", "finite-difference"):
            kept = [footprint.probe_bytes(k, retained_graphs=1, hvp_method=method) for k in (4, 20)]
            rebuilt = [
                footprint.probe_bytes(k, retained_graphs=0, hvp_method=method) for k in (4, 20)
            ]
            assert kept[0] < kept[1] and rebuilt[0] < rebuilt[1]
            assert rebuilt[0] <= kept[0] and rebuilt[1] <= kept[1]
            # every basis vector costs at least one vector of the model's size
            assert rebuilt[1] - rebuilt[0] >= 16 * footprint.vector_bytes
        # and the probe holds at least what training holds between steps, and a graph
        lean = footprint.probe_bytes(MIN_BASIS, retained_graphs=0, hvp_method="auto")
        assert lean >= 2 * footprint.vector_bytes + footprint.graph_bytes


def test_a_probe_that_fits_keeps_the_defaults():
    choice = choose(SMALL, 16 * GIB)
    assert (choice.max_basis, choice.retain_graphs, choice.graph_kept) == (20, None, True)
    assert choice.fits and not choice.changed


def test_the_largest_basis_that_fits_first_with_the_graph_kept():
    kept = [LARGE.probe_bytes(k, retained_graphs=1, hvp_method="auto") for k in range(21)]
    limit = (kept[12] + kept[13]) // 2  # basis 12 fits with the graph kept, 13 does not
    choice = choose(LARGE, limit)
    assert (choice.max_basis, choice.retain_graphs, choice.graph_kept) == (12, None, True)
    assert choice.fits and choice.changed and choice.probe_bytes == kept[12] <= limit


def test_below_a_basis_of_8_the_graph_is_rebuilt_for_a_larger_basis():
    kept = LARGE.probe_bytes(RETAINED_MIN_BASIS, retained_graphs=1, hvp_method="auto")
    rebuilt = [LARGE.probe_bytes(k, retained_graphs=0, hvp_method="auto") for k in range(21)]
    limit = kept - 1  # not even the smallest kept-graph basis fits
    choice = choose(LARGE, limit)
    largest = max(k for k in range(MIN_BASIS, 21) if rebuilt[k] <= limit)
    assert (choice.max_basis, choice.retain_graphs, choice.graph_kept) == (largest, False, False)
    assert largest >= RETAINED_MIN_BASIS  # rebuilding saves more than a basis vector or two


def test_nothing_fits_gives_the_leanest_and_says_by_how_much():
    choice = choose(LARGE, LARGE.training_step_bytes * 3 // 2)
    assert (choice.max_basis, choice.retain_graphs, choice.fits) == (MIN_BASIS, False, False)
    lean = LARGE.probe_bytes(MIN_BASIS, retained_graphs=0, hvp_method="auto")
    assert choice.probe_bytes == choice.smallest_bytes == lean
    needed = math.ceil(10 * lean / LARGE.training_step_bytes) / 10
    assert f"allow --probe-memory {needed:g} or more" in choice.shortfall()
    assert "may run out of memory" in choice.describe()


@pytest.mark.parametrize(
    ("options", "basis", "kept"),
    [
        ({"max_basis": 20}, 20, False),  # the basis given: only the graph is chosen
        ({"retain_graphs": True, "retain_given": True}, MIN_BASIS, True),  # graph given
        ({"hvp_method": "retained"}, MIN_BASIS, True),  # a method given keeps its graph
        ({"hvp_method": "double-backward"}, MIN_BASIS, False),
        ({"max_basis": 20, "hvp_method": "retained"}, 20, True),  # nothing left to choose
    ],
)
def test_options_the_user_gave_are_kept_even_when_the_probe_does_not_fit(options, basis, kept):
    choice = choose(LARGE, LARGE.training_step_bytes, **options)
    assert (choice.max_basis, choice.graph_kept, choice.fits) == (basis, kept, False)
    # the run's retain_graphs changes only where the graph was the choice's to make
    chosen_graph = options.get("hvp_method", "auto") == "auto" and "retain_given" not in options
    assert choice.retain_graphs is (False if chosen_graph else None)


def test_several_probe_batches_keep_all_their_graphs_only_when_allowed():
    footprint = MemoryFootprint(
        vector_bytes=GIB, optimizer_vectors=0, activation_bytes=GIB, graph_bytes=3 * GIB,
        num_probe_batches=4,
    )  # fmt: skip
    kept_all = footprint.probe_bytes(20, retained_graphs=4, hvp_method="auto")
    assert kept_all - footprint.probe_bytes(20, retained_graphs=1, hvp_method="auto") >= 9 * GIB
    # retain_graphs True (given or chosen for small batches): all four graphs are counted
    assert choose(footprint, 10**15, retain_graphs=True).probe_bytes == kept_all
    # not allowed: graphs are rebuilt batch by batch, nothing to choose there
    choice = choose(footprint, 10**15, retain_graphs=None)
    assert not choice.graph_kept and choice.retain_graphs is None and not choice.changed


def test_finite_difference_products_hold_activations_not_the_graph():
    kwargs = {"retained_graphs": 0}
    exact = LARGE.probe_bytes(8, hvp_method="double-backward", **kwargs)
    approximate = LARGE.probe_bytes(8, hvp_method="finite-difference", **kwargs)
    assert approximate < exact
    assert exact - approximate >= LARGE.graph_bytes - 2 * LARGE.activation_bytes


def test_saved_activation_bytes_are_the_forwards_share_of_the_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    sizes = {}
    for rows in (16, 64):
        batch = (torch.randn(rows, 32), torch.randint(0, 4, (rows,)))
        sizes[rows] = (saved_activation_bytes(model, loss_fn, batch),
                       saved_graph_bytes(model, loss_fn, batch))  # fmt: skip
        activations, graph = sizes[rows]
        assert rows * 64 * 4 <= activations < graph  # at least the hidden layer's output
    assert sizes[64][0] > 3 * sizes[16][0]


def test_optimizer_state_vectors():
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    assert optimizer_state_vectors(torch.optim.SGD(parameters, lr=0.1)) == 0
    assert optimizer_state_vectors(torch.optim.SGD(parameters, lr=0.1, momentum=0.9)) == 1
    assert optimizer_state_vectors(torch.optim.AdamW(parameters)) == 2
    assert optimizer_state_vectors(torch.optim.Adam(parameters, amsgrad=True)) == 3
    assert optimizer_state_vectors(torch.optim.Adagrad(parameters)) == 0  # not known here


MODEL = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 3))

def dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]

defaults = {"probe_batches": 1, "lr": 0.2, "lr_search": False}
"""


def _spec(tmp_path):
    path = tmp_path / "mlp.py"
    path.write_text(MODEL)
    return load_model_file(path)


def _config(**options):
    return RunConfig.from_options(
        {"probe_batches": 1, "lr": 0.2, "lr_search": False},
        {"steps": 9, "probe_every": 2, "estimators": ("hvp",), **options},
    )


def test_a_small_model_keeps_the_default_basis_and_graph(tmp_path):
    prepared = prepare_run(_spec(tmp_path), _config())
    assert prepared.config.max_basis == DEFAULT_MAX_BASIS
    assert prepared.config.retain_graphs is None  # one probe batch: kept, as before
    choice = prepared.probe_memory_choice
    assert choice.fits and not choice.changed and choice.graph_kept
    recorded = prepared.recorded_config()["probe_memory_estimate"]
    assert recorded["probe_bytes"] == choice.probe_bytes > recorded["training_step_bytes"]


def test_the_memory_saving_probe_measures_the_same_eigenvalues(tmp_path, monkeypatch):
    """A device too small for the default probe: the run rebuilds the graph per product and
    holds a basis of 6, and its probes certify the eigenvalues of the default run to rtol."""
    spec = _spec(tmp_path)
    default = prepare_run(spec, _config())
    with unchanged_model_state(default.model):
        footprint = count_memory_footprint(
            spec.call_loss, default.model, default.probe_batches[0], torch.device("cpu"),
            default.optimizer, num_probe_batches=1,
        )  # fmt: skip
    lean = footprint.probe_bytes(6, retained_graphs=0, hvp_method="auto")
    monkeypatch.setattr("smoothprof.train.device_memory_bytes", lambda device: int(lean / 0.8) + 1)
    saving = prepare_run(spec, _config())
    choice = saving.probe_memory_choice
    assert (saving.config.max_basis, saving.config.retain_graphs) == (6, False)
    assert choice.changed and choice.fits and not choice.graph_kept
    assert "--max-basis 6, the double-backward graph rebuilt per product" in choice.describe()
    results = [train(default), train(saving)]
    assert results[0].hvp_method == "retained" and results[1].hvp_method == "double-backward"
    assert results[1].restarted_solves > 0  # the basis of 6 was full and restarted
    first, second = (result.probes for result in results)
    assert len(first) == len(second) == 5
    for a, b in zip(first, second):
        assert a.hessian_converged and b.hessian_converged
        assert b.hessian_eig == pytest.approx(a.hessian_eig, rel=2e-3)  # both within 1e-3


def test_a_user_limit_that_cannot_be_met_stops_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot fit --probe-memory 1\.1.*allow"):
        prepare_run(_spec(tmp_path), _config(probe_memory=1.1))
    with pytest.raises(ConfigError, match="probe_memory must be a number above 1"):
        _config(probe_memory=0.5)
    with pytest.raises(ConfigError, match="probe_memory sizes the hvp estimator's"):
        _config(probe_memory=3, estimators=("fd",))


def test_a_given_basis_is_never_changed(tmp_path, monkeypatch):
    monkeypatch.setattr("smoothprof.train.device_memory_bytes", lambda device: 1)
    prepared = prepare_run(_spec(tmp_path), _config(max_basis=30))
    assert prepared.config.max_basis == 30
    assert not prepared.probe_memory_choice.fits
    assert "may run out of memory" in prepared.probe_memory_choice.describe()


def test_the_run_header_says_what_it_chose(tmp_path):
    out = tmp_path / "x.h5"
    common = ["run", str(ASSETS / "good_minimal.py"), "-o", str(out), "--steps", "2", "--force"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--probe-memory", "1000"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "probe memory: about" in result.output
    assert "chosen to fit --probe-memory 1000, 1000x a training step's" in result.output
    plain = runner.invoke(app, common, env={"COLUMNS": "300"})
    assert "probe memory" not in plain.output  # nothing at stake: nothing to say
    short = runner.invoke(app, [*common, "--probe-memory", "1.01"], env={"COLUMNS": "300"})
    assert short.exit_code == 1
    assert short.output.startswith("error: the probe cannot fit --probe-memory 1.01")
    assert "Traceback" not in short.output
