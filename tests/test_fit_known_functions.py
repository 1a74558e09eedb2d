"""The fit recovers known (L0, L1) from trajectories measured by the real probe.

theory.md §1 gives functions with known, tight constants; summed over coordinates the Hessian
stays diagonal, so ||∇²f(x)|| = max_i f_i''(x_i) exactly:
- f(x) = sum_i cosh(b·x_i)/b²: ||∇²f|| = max_i cosh(b·x_i) <= 1 + b·||∇f||, (L0, L1) = (1, b);
- f(x) = sum_i exp(b·x_i)/b:   ||∇²f|| = b·max_i exp(b·x_i) <= b·||∇f||,  (L0, L1) = (0, b).
Both bounds are tight while one coordinate dominates the gradient, which the starting points
below arrange. A plain loop of clipped gradient descent on a model whose one parameter is the
vector x runs inside smoothprof.Probe, which writes an HDF5 trajectory through TrajectoryWriter;
the fit reads it back like `smoothprof fit` does. Clipping makes the early steps short and
equal, so the probes cover many decades of gradient norm, large ones included.

The column fitted is `hessian_norm`: Lanczos on this tiny diagonal Hessian is exact, so the
envelope of the measured points is the envelope of the function. `smoothness_fd` is the paper's
secant along the update: along a descent step of these convex functions the curvature falls, so
the secant is at most the Hessian norm and recovers L1 only when the steps are short compared with
1/b (see test_finite_difference_is_a_secant_below_the_hessian_norm).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import smoothprof
from smoothprof.cli import app

QUANTILE = 0.95


class Coordinates(nn.Module):
    """A model whose only parameter is the vector x."""

    def __init__(self, x0):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))


def cosh_loss(b):
    return lambda model, batch: torch.cosh(b * model.x).sum() / b**2


def exp_loss(b):
    return lambda model, batch: torch.exp(b * model.x).sum() / b


def probed_clipped_gd(loss_fn, x0, *, lr, clip, steps, path):
    """Clipped GD under the probe (every step, fd and hvp), written to `path`.

    Returns the parameters x_t before each update t, one row per step, for the exact values.
    """
    model = Coordinates(x0)
    batch = torch.zeros(1, dtype=torch.float64)  # the losses ignore it
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    points = []
    config = {"steps": steps, "lr": lr, "clip": clip, "optimizer": "sgd"}
    with smoothprof.TrajectoryWriter(path, attributes={"config": config}) as writer:
        probe = smoothprof.Probe(
            model, loss_fn, [batch], every=1, estimators=("hvp", "fd"), rtol=1e-8,
            on_record=writer.append_probe,
        )  # fmt: skip
        for step in range(steps):
            points.append(model.x.detach().numpy().copy())
            with probe.around_step(step):
                optimizer.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                optimizer.step()
            writer.append_train(
                {"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr,
                 "clipped": grad_norm > clip}
            )  # fmt: skip
    return np.array(points)


START_A, START_B = [4.0, 0.5, -0.3], [-0.2, -3.5, 0.8, 0.1]


@pytest.fixture(scope="module")
def cosh_runs(tmp_path_factory):
    """Two cosh runs (b = 2, steps of length lr·clip = 0.1) from different starts, each dominated
    by one coordinate at first; shared by the tests that only read them."""
    folder = tmp_path_factory.mktemp("cosh")
    runs = {}
    for name, x0 in [("a", START_A), ("b", START_B)]:
        path = folder / f"{name}.h5"
        points = probed_clipped_gd(cosh_loss(2.0), x0, lr=0.2, clip=0.5, steps=120, path=path)
        runs[name] = (path, points)
    return runs


def cosh_run(cosh_runs, tmp_path, b, x0):
    if b == 2.0 and x0 == START_A:
        return cosh_runs["a"]
    path = tmp_path / "cosh.h5"
    return path, probed_clipped_gd(cosh_loss(b), x0, lr=0.2, clip=0.5, steps=120, path=path)


@pytest.mark.parametrize(("b", "x0"), [(2.0, START_A), (3.0, [3.0, -0.5, 0.25, 1.0])])
def test_cosh_trajectory_recovers_L0_one_and_L1_b(cosh_runs, tmp_path, b, x0):
    path, points = cosh_run(cosh_runs, tmp_path, b, x0)
    probes = smoothprof.read_trajectory(path).probes
    g, hessian = probes["grad_norm"], probes["hessian_norm"]

    # The probe measured the function's own values: the column fitted is exact here.
    assert np.array_equal(probes["step"], np.arange(120))
    np.testing.assert_allclose(g, np.linalg.norm(np.sinh(b * points) / b, axis=1), rtol=1e-12)
    np.testing.assert_allclose(hessian, np.cosh(b * points).max(axis=1), rtol=1e-10)
    assert probes["hessian_converged"].all()
    assert g.max() / g.min() > 1e8  # from the clipped phase down to convergence
    assert np.all(hessian <= 1.0 + b * g + 1e-9)  # the theory's bound holds at every probe

    fit = smoothprof.fit_envelope(g, hessian, quantile=QUANTILE, num_bootstrap=0)
    assert pytest.approx(1.0, rel=0.1) == fit.L0
    assert pytest.approx(b, rel=0.1) == fit.L1


@pytest.mark.parametrize(
    ("b", "x0", "lr"), [(1.0, [3.0, 0.0, -1.0], 0.3), (2.0, [2.0, 0.0, -1.0], 0.1)]
)
def test_exp_trajectory_recovers_L0_zero_and_L1_b(tmp_path, b, x0, lr):
    path = tmp_path / "exp.h5"
    points = probed_clipped_gd(exp_loss(b), x0, lr=lr, clip=1.0, steps=150, path=path)
    probes = smoothprof.read_trajectory(path).probes
    g, hessian = probes["grad_norm"], probes["hessian_norm"]
    np.testing.assert_allclose(g, np.linalg.norm(np.exp(b * points), axis=1), rtol=1e-12)
    np.testing.assert_allclose(hessian, b * np.exp(b * points).max(axis=1), rtol=1e-10)
    assert g.max() / g.min() > 100

    fit = smoothprof.fit_envelope(g, hessian, quantile=QUANTILE, num_bootstrap=0)
    assert pytest.approx(b, rel=0.1) == fit.L1
    # "Within 10%" of L0 = 0: the intercept is under a tenth of the envelope at every measured
    # gradient norm (here the fit gives exactly 0).
    assert 0.0 <= fit.L0 <= 0.1 * fit.L1 * fit.G_min


@pytest.mark.parametrize("step_length", [0.1, 0.5])
def test_finite_difference_is_a_secant_below_the_hessian_norm(cosh_runs, tmp_path, step_length):
    # Along these descent steps the curvature only falls, so the secant cannot exceed the
    # Hessian norm at the start of the step. With clipped steps of length 0.1 (against 1/b = 0.5)
    # it is close to the tangent and recovers L1 within 10% too; with steps of length 0.5 it falls
    # short, which is why `smoothprof fit` prefers the hvp column when there is one.
    b = 2.0
    if step_length == 0.1:
        path, _ = cosh_runs["a"]  # lr 0.2, clip 0.5
    else:
        path = tmp_path / "long.h5"
        probed_clipped_gd(cosh_loss(b), START_A, lr=0.5, clip=1.0, steps=40, path=path)
    probes = smoothprof.read_trajectory(path).probes
    g, fd, hessian = probes["grad_norm"], probes["smoothness_fd"], probes["hessian_norm"]
    assert np.all(fd <= hessian * (1 + 1e-9))
    fit_fd = smoothprof.fit_envelope(g, fd, quantile=QUANTILE, num_bootstrap=0)
    fit_hvp = smoothprof.fit_envelope(g, hessian, quantile=QUANTILE, num_bootstrap=0)
    assert fit_fd.L1 <= fit_hvp.L1 * (1 + 1e-9)
    assert pytest.approx(1.0, rel=0.1) == fit_fd.L0
    if step_length == 0.1:
        assert pytest.approx(b, rel=0.1) == fit_fd.L1
    else:
        assert 0.9 * b > fit_fd.L1


def fit_json(*args):
    result = CliRunner().invoke(app, ["fit", *map(str, args), "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_fits_several_files_together(cosh_runs):
    (path_a, _), (path_b, _) = cosh_runs["a"], cosh_runs["b"]
    a, b = smoothprof.read_trajectory(path_a), smoothprof.read_trajectory(path_b)
    data = fit_json(path_a, path_b)
    assert data["files"] == [str(path_a), str(path_b)]
    assert data["estimator"] == "hvp"
    assert data["statistics"]["num_points"] == a.num_probes + b.num_probes == 240
    pooled = smoothprof.fit_envelope(
        np.concatenate([a.probes["grad_norm"], b.probes["grad_norm"]]),
        np.concatenate([a.probes["hessian_norm"], b.probes["hessian_norm"]]),
        num_bootstrap=0,
    )
    assert (data["L0"], data["L1"]) == (pooled.L0, pooled.L1)
    assert data["L0"] == pytest.approx(1.0, rel=0.1)
    assert data["L1"] == pytest.approx(2.0, rel=0.1)
    # Each file alone gives its own fit; together they are one envelope, not an average.
    alone = fit_json(path_b)
    assert alone["statistics"]["num_points"] == 120
    assert alone["num_steps"] == 120 and data["num_steps"] == 120


def test_cli_skip_steps_drops_the_early_probes_of_every_file(cosh_runs):
    (path_a, _), (path_b, _) = cosh_runs["a"], cosh_runs["b"]
    data = fit_json(path_a, path_b, "--skip-steps", 30)
    assert data["skip_steps"] == 30
    assert data["statistics"]["num_points"] == 2 * (120 - 30)
    late = [smoothprof.read_trajectory(p).probes for p in (path_a, path_b)]
    keep = [probes["step"] >= 30 for probes in late]
    expected = smoothprof.fit_envelope(
        np.concatenate([p["grad_norm"][k] for p, k in zip(late, keep)]),
        np.concatenate([p["hessian_norm"][k] for p, k in zip(late, keep)]),
        num_bootstrap=0,
    )
    assert (data["L0"], data["L1"]) == (expected.L0, expected.L1)
    # Skipping every probe is a user error naming the option, not a traceback.
    result = CliRunner().invoke(app, ["fit", str(path_a), "--skip-steps", "1000"])
    assert result.exit_code == 1
    assert "--skip-steps 1000 leaves 0 probe(s)" in result.stderr


def test_cli_estimator_chooses_the_column(cosh_runs):
    path, _ = cosh_runs["a"]
    probes = smoothprof.read_trajectory(path).probes
    for estimator, column in [("hvp", "hessian_norm"), ("fd", "smoothness_fd")]:
        data = fit_json(path, "--estimator", estimator)
        assert data["estimator"] == estimator
        expected = smoothprof.fit_envelope(probes["grad_norm"], probes[column], num_bootstrap=0)
        assert (data["L0"], data["L1"]) == (expected.L0, expected.L1)
    bad = CliRunner().invoke(app, ["fit", str(path), "--estimator", "magic"])
    assert bad.exit_code == 2
