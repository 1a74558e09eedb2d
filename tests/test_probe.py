"""The probe against exact float64 references, and its invisibility to the training it observes."""

import contextlib
import math
import random
import time

import numpy as np
import pytest
import torch
from conftest import dense_hessian, small_models, solver_storage_bytes, top_eigenvalue
from torch import nn

from smoothprof import Probe, hessian_norm
from smoothprof.objective import (
    EXACT_HVP_METHODS,
    FINITE_DIFFERENCE_HVP_RTOL,
    HVP_METHODS,
    ProbeKernels,
    ProbeObjective,
    double_backward_backends,
    flatten,
)
from smoothprof.probe import ProbeRecord, fastest_hvp_method
from smoothprof.schedule import BUDGET_FLOOR, every_k_steps, log_spaced_steps


@pytest.mark.parametrize("name, model, loss_fn, batches", small_models(), ids=lambda v: str(v)[:8])
@pytest.mark.parametrize("method", EXACT_HVP_METHODS)
def test_hessian_norm_matches_dense_hessian(name, model, loss_fn, batches, method):
    exact = top_eigenvalue(dense_hessian(model, loss_fn, batches))
    for rtol in (1e-3, 1e-8):
        result = hessian_norm(
            model, loss_fn, batches, rtol=rtol, hvp_method=method, retain_graphs=True
        )
        assert result.converged
        assert abs(result.eigenvalue - exact) <= rtol * abs(exact), name
        assert result.value == abs(result.eigenvalue)


@pytest.mark.parametrize("name, model, loss_fn, batches", small_models(), ids=lambda v: str(v)[:8])
@pytest.mark.parametrize("backends", ["aten", "probe"])
def test_hvp_matches_dense_hessian_columns(name, model, loss_fn, batches, backends):
    """With ATen's kernels as the model runs them, and with the probe's (math attention, batch
    norm from its statistics): every method, every backend, the same exact products."""
    hessian = dense_hessian(model, loss_fn, batches)
    context = (
        double_backward_backends(torch.device("cpu"))
        if backends == "probe"
        else contextlib.nullcontext()
    )
    with context:
        objective = ProbeObjective(model, loss_fn, batches, retain_graphs=True)
        objective.gradient(create_graph=True)
        vector = torch.randn(hessian.shape[0], dtype=torch.float64)
        for method in EXACT_HVP_METHODS:
            product = objective.hvp_with(method, vector)
            torch.testing.assert_close(product, hessian @ vector, rtol=1e-10, atol=1e-12)


def test_float32_model_is_measured_in_float32():
    _, model, loss_fn, batches = small_models()[0]
    exact = top_eigenvalue(dense_hessian(model, loss_fn, batches))
    model32 = model.float()
    batches32 = [(x.float(), y) for x, y in batches]
    result = hessian_norm(model32, loss_fn, batches32, rtol=1e-3)
    assert result.eigenvector.dtype == torch.float32
    assert abs(result.eigenvalue - exact) <= 2e-3 * abs(exact)
    model.double()


def four_cluster_regression(dtype):
    """A linear model with squared loss, whose Hessian X^T X / m has the top eigenvalues 10,
    9.99, 9.98, 9.97 (1e-3 apart, relative) and the other 96 uniform in [0, 5]."""
    generator = torch.Generator().manual_seed(0)
    d, m = 100, 200
    eigenvalues = torch.cat([
        torch.tensor([10.0, 9.99, 9.98, 9.97], dtype=torch.float64),
        5 * torch.rand(d - 4, generator=generator, dtype=torch.float64),
    ])  # fmt: skip
    left, _ = torch.linalg.qr(torch.randn(m, d, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    x = (left * torch.sqrt(m * eigenvalues)) @ right.T
    y = torch.randn(m, 1, generator=generator, dtype=torch.float64)
    exact = float(torch.linalg.eigvalsh(x.T @ x / m).max())
    model = nn.Linear(d, 1, bias=False).to(dtype)
    return model, [(x.to(dtype), y.to(dtype))], exact


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_norm_converged_is_within_rtol_of_the_top_of_a_cluster(dtype):
    # The case: a residual below rtol |theta| alone certified 9.98928 (seed 1) and
    # 9.97691 (seed 6) for 10.
    model, batches, exact = four_cluster_regression(dtype)

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean() / 2

    slack = 0.0 if dtype == torch.float64 else 1e-6
    for seed in range(10):
        result = hessian_norm(model, loss_fn, batches, rtol=1e-3, seed=seed)
        assert result.eigenvector.dtype == dtype
        assert result.converged, seed
        assert abs(result.value - exact) <= (1e-3 + slack) * exact, (seed, result.value)


class Coordinates(nn.Module):
    """A model that is just a parameter vector; the loss is a sum over its coordinates."""

    def __init__(self, values):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self, _batch):
        return self.x


def cosh_loss(b):
    return lambda model, batch: (torch.cosh(b * model(batch)) / b**2).sum()


def test_hessian_norm_on_known_l0_l1_function():
    # f(x) = sum cosh(b x_i) / b^2: Hessian diag(cosh(b x_i)), (L0, L1) = (1, b) [theory.md 1].
    b = 3.0
    model = Coordinates([0.1, -0.4, 0.7, 0.2])
    result = hessian_norm(model, cosh_loss(b), [None], rtol=1e-10)
    expected = math.cosh(b * 0.7)
    assert result.value == pytest.approx(expected, rel=1e-9)
    gradient = torch.sinh(b * model.x.detach()) / b
    assert result.value <= 1 + b * float(torch.linalg.vector_norm(gradient)) + 1e-12


def test_hessian_norm_negative_curvature():
    # f(x) = -sum x_i^2 * c_i / 2 + x_0^4: at x = 0 the Hessian is diag(-c).
    model = Coordinates([0.0, 0.0, 0.0])
    c = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
    result = hessian_norm(model, lambda m, b: -(c * m(b) ** 2).sum() / 2 + m(b)[0] ** 4, [None])
    assert result.eigenvalue == pytest.approx(-5.0, rel=1e-6)
    assert result.value == pytest.approx(5.0, rel=1e-6)


def test_finite_difference_matches_exact_gradients():
    _, model, loss_fn, batches = small_models()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = Probe(model, loss_fn, batches, every=1, estimators=("fd",), fd_points=(0.5, 1.0))
    x0 = flatten([p.detach() for p in model.parameters()]).clone()
    probe.before_step(0)
    optimizer.zero_grad()
    loss_fn(model, batches[0]).backward()
    optimizer.step()
    record = probe.after_step()
    x1 = flatten([p.detach() for p in model.parameters()]).clone()

    def exact_gradient(point):
        objective_model = small_models()[0][1]
        with torch.no_grad():
            for p, chunk in zip(
                objective_model.parameters(),
                torch.split(point, [p.numel() for p in model.parameters()]),
            ):
                p.copy_(chunk.view_as(p))
        return ProbeObjective(objective_model, loss_fn, batches).gradient()[1]

    d = x1 - x0
    g0 = exact_gradient(x0)
    expected = max(
        float(torch.linalg.vector_norm(exact_gradient(x0 + gamma * d) - g0))
        / (gamma * float(torch.linalg.vector_norm(d)))
        for gamma in (0.5, 1.0)
    )
    assert record.smoothness_fd == pytest.approx(expected, rel=1e-10)
    assert record.grad_norm == pytest.approx(float(torch.linalg.vector_norm(g0)), rel=1e-12)
    assert math.isnan(record.hessian_norm) and record.hvp_count == 0


class NoisyNet(nn.Module):
    """BatchNorm and dropout: the two layers that make probing hard to keep invisible."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
        )

    def forward(self, x):
        return self.body(x)


def _state(model, optimizer):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "optimizer": repr(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def _assert_same_state(a, b):
    for key in ("params", "buffers"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["modes"] == b["modes"]
    assert a["optimizer"] == b["optimizer"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"])
    assert a["python_rng"] == b["python_rng"]


@pytest.mark.parametrize("hvp_method", ["auto", "finite-difference"])
def test_probe_leaves_every_piece_of_state_as_it_was(hvp_method):
    torch.manual_seed(0)
    model = NoisyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    optimizer.step()
    model.body[3].eval()  # a mixed-mode model: the probe must restore each module's own mode
    before = _state(model, optimizer)
    hessian_norm(model, loss_fn, batches, mode="train", hvp_method=hvp_method)
    _assert_same_state(before, _state(model, optimizer))
    probe = Probe(model, loss_fn, batches, every=1, hvp_method=hvp_method)
    probe.before_step(0)
    _assert_same_state(before, _state(model, optimizer))
    record = probe.after_step()
    _assert_same_state(before, _state(model, optimizer))
    assert record.hessian_converged and record.smoothness_fd != record.smoothness_fd  # no update


def test_dropout_masks_fixed_within_a_probe():
    torch.manual_seed(0)
    model = NoisyNet()
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    objective = ProbeObjective(model, loss_fn, batches)
    first = objective.gradient()
    second = objective.gradient()
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])


def test_warm_start_reduces_hvps():
    torch.manual_seed(0)
    _, model, loss_fn, batches = small_models()[2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = Probe(model, loss_fn, batches, every=1, estimators=("hvp",), rtol=1e-6)
    for step in range(4):
        with probe.around_step(step):
            optimizer.zero_grad()
            loss_fn(model, batches[0]).backward()
            optimizer.step()
    counts = [r.hvp_count for r in probe.records]
    assert all(r.hessian_converged for r in probe.records)
    assert max(counts[1:]) < counts[0]


def test_finite_difference_approaches_the_dense_hessian_along_a_small_update():
    """For a small update d the secant tends to ||H d|| / ||d|| with H the exact Hessian at x_t."""
    _, model, loss_fn, batches = small_models()[0]
    hessian = dense_hessian(model, loss_fn, batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    x0 = flatten([p.detach() for p in model.parameters()]).clone()
    probe = Probe(model, loss_fn, batches, every=1, estimators=("fd",))
    with probe.around_step(0):
        optimizer.zero_grad()
        loss_fn(model, batches[0]).backward()
        optimizer.step()
    d = flatten([p.detach() for p in model.parameters()]) - x0
    expected = float(torch.linalg.vector_norm(hessian @ d) / torch.linalg.vector_norm(d))
    assert probe.records[0].smoothness_fd == pytest.approx(expected, rel=1e-4)
    assert expected <= abs(top_eigenvalue(hessian)) + 1e-9


def test_curvature_along_the_gradient_matches_dense_hessian():
    _, model, loss_fn, batches = small_models()[0]
    hessian = dense_hessian(model, loss_fn, batches)
    probe = Probe(model, loss_fn, batches, every=1, estimators=("curvature",))
    probe.before_step(0)
    record = probe.after_step(update_made=False)
    gradient = ProbeObjective(model, loss_fn, batches).gradient()[1]
    expected = float(gradient @ hessian @ gradient / (gradient @ gradient))
    assert record.grad_curvature == pytest.approx(expected, rel=1e-10)
    assert math.isnan(record.hessian_norm) and math.isnan(record.smoothness_fd)


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=16, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("make", [TinyLSTM, TinyTransformer], ids=["lstm", "transformer"])
def test_every_model_kind_gets_a_working_hvp_method(make):
    torch.manual_seed(0)
    model = make().double()
    width = 3 if make is TinyLSTM else 8
    batches = [(torch.randn(4, 5, width, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    objective = ProbeObjective(model, loss_fn, batches)
    objective.gradient(create_graph=True)
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    method, timings = fastest_hvp_method(objective, vector)
    assert method in timings and set(timings) <= set(HVP_METHODS)
    exact = top_eigenvalue(dense_hessian(model, loss_fn, batches))
    for method in timings:
        result = hessian_norm(model, loss_fn, batches, hvp_method=method, rtol=1e-6)
        assert result.eigenvalue == pytest.approx(exact, rel=1e-5), method


def test_log_spaced_schedule():
    due = log_spaced_steps(per_decade=4)
    steps = [s for s in range(1001) if due(s)]
    assert steps[:4] == [0, 1, 2, 4]
    assert len(steps) == pytest.approx(1 + 4 * 3, abs=2)
    assert steps[-1] == 1000
    assert every_k_steps(0)(0) is False


def test_overhead_cap_skips_due_probes_but_not_the_floor():
    _, model, loss_fn, batches = small_models()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(probe, num_steps):
        for step in range(num_steps):
            with probe.around_step(step):
                optimizer.zero_grad()
                loss_fn(model, batches[0]).backward()
                optimizer.step()

    # the floor given: those steps, and the first due probe, are never skipped
    probe = Probe(model, loss_fn, batches, every=1, max_overhead=0.0, floor_steps=[3])
    train(probe, 5)
    assert [r.step for r in probe.records] == [0, 3]
    assert probe.skipped == 3
    # no floor given: the first BUDGET_FLOOR due probes
    probe = Probe(model, loss_fn, batches, every=2, max_overhead=0.0)
    train(probe, 2 * BUDGET_FLOOR + 6)
    assert [r.step for r in probe.records] == list(range(0, 2 * BUDGET_FLOOR, 2))
    assert probe.skipped == 3


def test_overhead_cap_counts_the_next_probe_at_the_last_ones_cost():
    import dataclasses

    _, model, loss_fn, batches = small_models()[0]
    probe = Probe(model, loss_fn, batches, every=1, max_overhead=0.25, floor_steps=[0])
    nan = float("nan")
    last = ProbeRecord(0, 1.0, 1.0, nan, nan, nan, nan, nan, 0, False, seconds=1.0)
    probe.records.append(last)
    probe.probe_seconds = 1.0
    # 5 s of training allow 1.25 s of probing: 1 s spent + 1 s expected is over, so skip.
    probe._started = time.perf_counter() - 6.0
    assert not probe.is_due(1) and probe.skipped == 1
    # 9 s of training allow 2.25 s: the next probe fits.
    probe._started = time.perf_counter() - 10.0
    assert probe.is_due(2)
    # A cheap last probe fits where an expensive one did not.
    probe.records[-1] = dataclasses.replace(last, seconds=0.1)
    probe._started = time.perf_counter() - 6.0
    assert probe.is_due(3)


def test_gradient_spread_over_batches():
    """sqrt(mean_b ||g_b - g||^2), against per-batch gradients taken one at a time."""
    _, model, loss_fn, batches = small_models()[0]
    batches = batches + [(b[0] * 2, b[1]) for b in batches]
    singles = [
        ProbeObjective(model, loss_fn, [b], seed=i).gradient()[1] for i, b in enumerate(batches)
    ]
    mean = torch.stack(singles).mean(0)
    expected = float(torch.stack([(g - mean).norm() ** 2 for g in singles]).mean().sqrt())
    _, gradient, spread = ProbeObjective(model, loss_fn, batches).gradient()
    torch.testing.assert_close(gradient, mean, rtol=1e-12, atol=1e-14)
    assert spread == pytest.approx(expected, rel=1e-10)


def test_saved_graph_bytes_grows_with_the_batch_and_skips_the_parameters():
    from smoothprof.objective import saved_graph_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    sizes = {}
    for rows in (256, 512):
        batch = (torch.randn(rows, 20), torch.randint(0, 3, (rows,)))
        sizes[rows] = saved_graph_bytes(model, loss_fn, batch)
    # At least the input and the hidden activations (float32), and linear in the batch.
    assert sizes[256] >= 256 * (20 + 64) * 4
    assert sizes[512] == pytest.approx(2 * sizes[256], rel=0.1)
    # A loss of the parameters alone saves nothing beyond them.
    squares = lambda m, b: sum((p**2).sum() for p in m.parameters())  # noqa: E731
    assert saved_graph_bytes(model, squares, None) < 64


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 3, 5, 5), (3, 3, 2, 4, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_from_statistics_is_atens_train_mode_batch_norm(shape, affine):
    torch.manual_seed(0)
    layer = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        len(shape)
    ](3, affine=affine).double()
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2)
            layer.bias.normal_()
    x = 3 * torch.randn(shape, dtype=torch.float64) + 1
    expected = layer(x)
    running = (layer.running_mean.clone(), layer.running_var.clone())
    with ProbeKernels():
        value = layer(x)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    # The probe restores running statistics anyway; the composite leaves them alone.
    assert torch.equal(layer.running_mean, running[0])
    assert torch.equal(layer.running_var, running[1])


def test_batch_norm_from_statistics_leaves_eval_mode_and_atens_errors_to_aten():
    layer = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        layer.running_mean.fill_(2.0)
    x = torch.randn(4, 3)
    with ProbeKernels():
        torch.testing.assert_close(layer(x), (x - 2.0) / math.sqrt(1 + layer.eps))
        layer.train()
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(torch.randn(1, 3))
        half = torch.randn(4, 3, dtype=torch.bfloat16)
        assert torch.equal(
            layer.to(torch.bfloat16)(half),
            nn.functional.batch_norm(half, None, None, layer.weight, layer.bias, training=True),
        )


def test_writing_a_row_counts_as_probing_for_the_overhead_cap():
    _, model, loss_fn, batches = small_models()[0]

    def slow_writer(record):
        time.sleep(0.05)

    probe = Probe(model, loss_fn, batches, every=1, max_overhead=0.25, on_record=slow_writer)
    with probe.around_step(0):
        pass
    assert probe.probe_seconds >= probe.records[0].seconds + 0.05


def test_on_hvp_counts_every_product_of_each_probe():
    _, model, loss_fn, batches = small_models()[0]
    calls = []
    probe = Probe(model, loss_fn, batches, every=2, on_hvp=lambda step, n: calls.append((step, n)))
    for step in range(4):
        with probe.around_step(step):
            pass
    for record in probe.records:
        counts = [n for step, n in calls if step == record.step]
        # The curvature along the gradient's product, then the eigen-solver's.
        assert counts == list(range(1, record.hvp_count + 2))
    assert {step for step, _ in calls} == {0, 2}


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", ["zero", "given"])
def test_the_probes_lstm_is_atens(num_layers, bidirectional, batch_first, bias, state, monkeypatch):
    import smoothprof.objective as objective_module

    torch.manual_seed(0)
    lstm = nn.LSTM(
        3, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
        bias=bias, dropout=0.5 if num_layers > 1 else 0.0,
    ).double().eval()  # fmt: skip
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    batch = 2 if batch_first else 5
    shape = (num_layers * (2 if bidirectional else 1), batch, 4)
    hx = None
    if state == "given":
        hx = (torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64))
    expected, (h_n, c_n) = lstm(x, hx)
    used = []
    original = objective_module.lstm_from_cells
    monkeypatch.setattr(
        objective_module, "lstm_from_cells", lambda *a: used.append(1) or original(*a)
    )
    with ProbeKernels():
        value, (h, c) = lstm(x, hx)
    assert used
    for mine, atens in ((value, expected), (h, h_n), (c, c_n)):
        torch.testing.assert_close(mine, atens, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_the_probe_leaves_lstms_it_does_not_rebuild_to_aten(monkeypatch):
    import smoothprof.objective as objective_module

    monkeypatch.setattr(
        objective_module, "lstm_from_cells", lambda *a: pytest.fail("rebuilt an LSTM")
    )
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    cases = [
        (nn.LSTM(3, 4, proj_size=2), x),  # projections
        (nn.LSTM(3, 4, num_layers=2, dropout=0.5).train(), x),  # dropout between layers
        (
            nn.LSTM(3, 4, batch_first=True),
            nn.utils.rnn.pack_padded_sequence(x, [5, 3], batch_first=True, enforce_sorted=False),
        ),
        (nn.LSTM(3, 4).to(torch.bfloat16), x.to(torch.bfloat16)),
    ]
    for lstm, inputs in cases:
        with ProbeKernels():
            lstm(inputs)


@pytest.mark.parametrize("name, model, loss_fn, batches", small_models(), ids=lambda v: str(v)[:8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_finite_difference_hvp_against_the_dense_float64_hessian(
    name, model, loss_fn, batches, dtype
):
    """Two gradients per product, within the documented relative error of the exact product
    (measured worst over these models: 4e-10 in float64, 3e-4 in float32), and the parameters
    back bit for bit after every product."""
    hessian = dense_hessian(model, loss_fn, batches)
    model = model.to(dtype)
    batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    try:
        with double_backward_backends(torch.device("cpu")):
            objective = ProbeObjective(model, loss_fn, batches, hvp_method="finite-difference")
            for _ in range(5):
                vector = torch.randn(hessian.shape[0], dtype=torch.float64, generator=generator)
                product = objective.hvp(vector.to(dtype)).double()
                exact = hessian @ vector
                error = torch.linalg.vector_norm(product - exact) / torch.linalg.vector_norm(exact)
                assert error <= FINITE_DIFFERENCE_HVP_RTOL[dtype], name
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert objective.num_hvps == 5
    finally:
        model.double()


def test_finite_difference_hvp_step_follows_the_parameters_scale_and_dtype():
    from smoothprof.objective import finite_difference_hvp_step

    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    assert finite_difference_hvp_step(0.5, 1.0, torch.float32) == pytest.approx(eps32 ** (1 / 3))
    assert finite_difference_hvp_step(100.0, 2.0, torch.float64) == pytest.approx(
        eps64 ** (1 / 3) * 50
    )


def test_finite_difference_hvp_step_scales_with_the_parameters_the_vector_moves():
    # A large parameter beside the curved one, as an N(0, 1) embedding table beside the
    # direction of sharpest curvature: f = 1e-3 t^2 + cos(3 s) / 9, H = diag(2e-3, -cos(3 s)).
    # A step scaled by ||x|| (200) would be 1.0 long in float32, where cos(3 s) is far from
    # quadratic; scaled by x along v (0.3) it is 5e-3 long.
    model = Coordinates([200.0, 0.3]).float()

    def loss(m, batch):
        t, s = m(batch)
        return 1e-3 * t**2 + torch.cos(3 * s) / 9

    objective = ProbeObjective(model, loss, [None], hvp_method="finite-difference")
    product = objective.hvp(torch.tensor([0.0, 2.0]))
    exact = -2.0 * math.cos(0.9)
    assert float(product[1]) == pytest.approx(exact, rel=FINITE_DIFFERENCE_HVP_RTOL[torch.float32])
    assert float(product[0]) == pytest.approx(0.0, abs=1e-3)
    assert torch.equal(model.x.detach(), torch.tensor([200.0, 0.3]))


@pytest.mark.parametrize("name, model, loss_fn, batches", small_models(), ids=lambda v: str(v)[:8])
def test_hessian_norm_by_finite_difference_hvps_matches_dense_hessian(
    name, model, loss_fn, batches
):
    exact = top_eigenvalue(dense_hessian(model, loss_fn, batches))
    result = hessian_norm(model, loss_fn, batches, rtol=1e-6, hvp_method="finite-difference")
    assert result.converged
    assert abs(result.eigenvalue - exact) <= 1e-6 * abs(exact), name


def test_auto_falls_back_to_finite_difference_when_nothing_differentiates_twice():
    # ATen's hardsigmoid called directly (the probe's composite replaces F.hardsigmoid only):
    # f(x) = 9 sum hardsigmoid(x_i)^2 + sum c_i x_i^2 / 2 has the Hessian diag(1/2 + c) for
    # |x_i| < 3.
    c = torch.tensor([1.0, 5.0, 2.0, 0.0], dtype=torch.float64)
    model = Coordinates([0.1, -0.4, 0.7, 0.2])

    def loss(m, batch):
        x = m(batch)
        return 9 * (torch.ops.aten.hardsigmoid(x) ** 2).sum() + (c * x**2).sum() / 2

    objective = ProbeObjective(model, loss, [None])
    objective.gradient(create_graph=True)
    for method in EXACT_HVP_METHODS:
        with pytest.raises(Exception):  # noqa: B017 - each fails its own way
            objective.hvp_with(method, torch.ones(4, dtype=torch.float64))
    probe = Probe(model, loss, [None], every=1, estimators=("hvp", "curvature"), rtol=1e-8)
    with probe.around_step(0):
        pass
    assert probe.hvp_method == "finite-difference" and not probe.failed
    assert probe.records[0].hessian_norm == pytest.approx(5.5, rel=1e-8)
    x = model.x.detach()
    gradient = 3 * (x / 6 + 0.5) + c * x
    expected = float(((0.5 + c) * gradient**2).sum() / (gradient**2).sum())
    assert probe.records[0].grad_curvature == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("name", ["hardsigmoid", "hardswish"])
def test_the_probes_hard_activations_are_atens(name):
    torch.manual_seed(0)
    x = torch.cat([4 * torch.randn(200, dtype=torch.float64), torch.tensor([-3.0, 0, 3.0])])
    x = x.double().requires_grad_()
    aten = getattr(nn.functional, name)
    expected = aten(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    layer = {"hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish}[name]
    with ProbeKernels():
        value = aten(x)
        inplace = layer(inplace=True)(x.detach().clone())
        (grad,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        # ATen's kernel has none: a second derivative (hardsigmoid's first is constant: zero)
        second = torch.zeros_like(x)
        if grad.requires_grad:
            (second,) = torch.autograd.grad(grad.sum(), x)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inplace, expected.detach(), rtol=1e-12, atol=1e-12)
    kinks = x.detach().abs() == 3  # the derivatives differ only at the kinks themselves
    inside, above = x.detach().abs() < 3, x.detach() > 3
    if name == "hardsigmoid":
        exact_grad = inside.double() / 6
    else:
        exact_grad = torch.where(inside, (2 * x.detach() + 3) / 6, above.double())
    torch.testing.assert_close(grad[~kinks], exact_grad[~kinks], rtol=1e-12, atol=1e-12)
    # ATen's float64 backward multiplies by 1/6 rounded to float32: 3e-8 relative.
    torch.testing.assert_close(grad[~kinks], expected_grad[~kinks], rtol=1e-7, atol=1e-12)
    curvature = 1 / 3 if name == "hardswish" else 0.0
    torch.testing.assert_close(second[inside], torch.full_like(second[inside], curvature))


def test_a_model_with_hard_activations_is_probed_exactly_and_else_by_finite_difference(
    monkeypatch, clean_sys_path
):
    """With the probe's composite activations the exact methods work; without them (ATen's
    kernels) ``auto`` falls back to finite differences, within their error of the same value."""
    from conftest import ASSETS

    import smoothprof.objective as objective_module
    from smoothprof.loading import load_model_file

    torch.manual_seed(0)
    model_file = load_model_file(ASSETS / "good_hard_activations.py")
    model = model_file.make_model().double()
    batches = [(x.double(), y) for x, y in list(model_file.make_dataloader())[:2]]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    probe = Probe(model, loss_fn, batches, every=1, rtol=1e-8)
    with probe.around_step(0):
        pass
    assert probe.hvp_method == "double-backward" and not probe.failed
    exact = probe.records[0]
    monkeypatch.setattr(objective_module, "hardsigmoid_from_clamp", nn.functional.hardsigmoid)
    probe = Probe(model, loss_fn, batches, every=1, rtol=1e-8)
    with probe.around_step(0):
        pass
    assert probe.hvp_method == "finite-difference" and not probe.failed
    record = probe.records[0]
    assert record.hessian_norm == pytest.approx(exact.hessian_norm, rel=1e-6)
    assert record.grad_curvature == pytest.approx(exact.grad_curvature, rel=1e-6)


def test_an_estimator_failing_mid_run_leaves_training_alone(monkeypatch):
    import smoothprof.probe as probe_module
    from smoothprof.probe import ProbeEstimatorWarning

    calls = []
    solve = probe_module.lanczos_top_eigenpair

    def fails_from_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError("out of memory\nsecond line")
        return solve(*args, **kwargs)

    monkeypatch.setattr(probe_module, "lanczos_top_eigenpair", fails_from_the_third)

    def train(probed):
        torch.manual_seed(0)
        model = NoisyNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
        probe = Probe(model, loss_fn, batches, every=2) if probed else None
        for step in range(10):
            with probe.around_step(step) if probe else contextlib.nullcontext():
                optimizer.zero_grad()
                loss_fn(model, batches[step % 2]).backward()
                optimizer.step()
        return model, probe

    with pytest.warns(ProbeEstimatorWarning) as caught:
        model, probe = train(True)
    assert [str(w.message) for w in caught] == [
        "hvp failed at step 4 (RuntimeError: out of memory); the run goes on without it"
    ]
    assert len(calls) == 3  # later probes skip the failed estimator
    assert [r.step for r in probe.records] == [0, 2, 4, 6, 8]
    assert [math.isnan(r.hessian_norm) for r in probe.records] == [False] * 2 + [True] * 3
    assert all(math.isfinite(r.smoothness_fd) for r in probe.records)
    assert all(math.isfinite(r.grad_curvature) for r in probe.records)
    unprobed, _ = train(False)
    for a, b in zip(model.state_dict().values(), unprobed.state_dict().values()):
        assert torch.equal(a, b)


def test_no_hvp_method_working_and_fd_failing_are_each_said_once(monkeypatch):
    import smoothprof.probe as probe_module
    from smoothprof.probe import ProbeEstimatorWarning

    def raises(*args, **kwargs):
        raise ValueError("no kernel")

    monkeypatch.setattr(ProbeObjective, "hvp_with", raises)
    monkeypatch.setattr(probe_module, "finite_difference_smoothness", raises)
    _, model, loss_fn, batches = small_models()[0]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, loss_fn, batches, every=1)
    with pytest.warns(ProbeEstimatorWarning) as caught:
        for step in range(3):
            with probe.around_step(step):
                optimizer.zero_grad()
                loss_fn(model, batches[0]).backward()
                optimizer.step()
    assert [str(w.message) for w in caught] == [
        "hvp and curvature failed at step 0 (ValueError: no kernel); the run goes on without them",
        "fd failed at step 0 (ValueError: no kernel); the run goes on without it",
    ]
    assert sorted(probe.failed) == ["curvature", "fd", "hvp"]
    for record in probe.records:
        assert math.isfinite(record.grad_norm) and record.hvp_count == 0
        assert all(math.isnan(v) for v in (record.hessian_norm, record.grad_curvature))
        assert math.isnan(record.smoothness_fd)
    # The updates were the optimizer's alone: the failed fd estimator put x_{t+1} back.
    probed = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    unprobed = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        unprobed.zero_grad()
        loss_fn(model, batches[0]).backward()
        unprobed.step()
    assert all(torch.equal(a, p) for a, p in zip(probed, model.parameters()))


@pytest.mark.parametrize("name, model, loss_fn, batches", small_models(), ids=lambda v: str(v)[:8])
def test_hessian_norm_with_a_bounded_basis_matches_dense_hessian(name, model, loss_fn, batches):
    exact = top_eigenvalue(dense_hessian(model, loss_fn, batches))
    for rtol in (1e-3, 1e-8):
        result = hessian_norm(model, loss_fn, batches, rtol=rtol, max_basis=4, max_hvps=2000)
        assert result.converged, name
        assert abs(result.eigenvalue - exact) <= rtol * abs(exact), name
    assert result.restarts >= 1  # rtol 1e-8 takes more than 4 products on every model




def _live_full_size_bytes(dim: int) -> int:
    """Bytes of the distinct storages of every live tensor with at least ``dim`` elements."""
    import gc
    import warnings

    storages = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [value for value in gc.get_objects() if isinstance(value, torch.Tensor)]
    for value in tensors:
        if value.numel() >= dim:
            try:
                storage = value.untyped_storage()
            except NotImplementedError:  # a torch.func wrapper an earlier test left: no storage
                continue  # of its own (what it wraps is listed apart)
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("max_basis", [6, 20, None])
def test_probe_memory_is_bounded_and_does_not_grow_with_the_number_of_probes(
    monkeypatch, max_basis
):
    import smoothprof.probe as probe_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    dim = sum(p.numel() for p in model.parameters())
    batches = [(torch.randn(64, 8), torch.randint(0, 4, (64,)))]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    peaks: list[int] = []
    solve = probe_module.lanczos_top_eigenpair

    def measured(matvec, start, **kwargs):
        peaks.append(0)

        def product(vector):
            peaks[-1] = max(peaks[-1], solver_storage_bytes(dim))
            return matvec(vector)

        return solve(product, start, **kwargs)

    monkeypatch.setattr(probe_module, "lanczos_top_eigenpair", measured)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # rtol 1e-8: every probe's solve takes more products than 20 basis vectors
    probe = Probe(model, loss_fn, batches, every=1, estimators=("hvp",), rtol=1e-8,
                  max_hvps=300, max_basis=max_basis)  # fmt: skip
    live = []
    for step in range(6):
        with probe.around_step(step):
            optimizer.zero_grad()
            loss_fn(model, batches[0]).backward()
            optimizer.step()
        live.append(_live_full_size_bytes(dim))
    hvps = [record.hvp_count for record in probe.records]
    assert all(record.hessian_converged for record in probe.records)
    itemsize = 4  # float32
    if max_basis is None:
        # what the bound prevents: the basis holds one vector per product
        assert max(peaks) >= max(hvps) * dim * itemsize > 22 * dim * itemsize
        return
    assert probe.restarted_solves == len(probe.records) == 6
    assert min(hvps) > max_basis
    # the basis, the last new vector and the start (the probe's warm start), never more
    assert max(peaks) <= (max_basis + 2) * dim * itemsize
    # and nothing accumulates between probes: the same bytes live after the second as the last
    assert live[1:] == [live[1]] * 5, live
