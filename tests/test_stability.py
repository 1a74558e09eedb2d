"""The edge of stability: Adam's preconditioned sharpness against a dense float64 reference, the
stability thresholds, and what fit and plot make of them."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dense_hessian, small_models, top_eigenvalue

from smoothprof import Probe
from smoothprof.preconditioner import adam_inverse_sqrt_preconditioner, optimizer_stability
from smoothprof.stability import (
    KINDS,
    LATE_SHARE,
    edge_of_stability,
    kind_code,
    stability_threshold,
)

ADAMS = [
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": True}),
]


def dense_preconditioned_sharpness(model, loss_fn, batches, optimizer):
    """The largest eigenvalue of P^-1/2 H P^-1/2, from the dense Hessian and
    P computed here from the optimizer's state (independently of smoothprof's preconditioner)."""
    hessian = dense_hessian(model, loss_fn, batches)
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    diagonal = []
    for parameter in model.parameters():
        state = optimizer.state[parameter]
        second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        v_hat = second / (1 - beta2 ** float(state["step"]))
        diagonal.append((v_hat.sqrt() + eps).reshape(-1))
    inverse_sqrt = torch.cat(diagonal).rsqrt()
    matrix = inverse_sqrt[:, None] * hessian * inverse_sqrt[None, :]
    return float(torch.linalg.eigvalsh(matrix)[-1]), top_eigenvalue(matrix)


@pytest.mark.parametrize("optimizer_type, options", ADAMS, ids=["adam", "adamw-amsgrad"])
def test_preconditioned_sharpness_matches_dense_reference(optimizer_type, options):
    _, model, loss_fn, batches = small_models()[0]
    optimizer = optimizer_type(model.parameters(), **options)
    probe = Probe(model, loss_fn, batches, every=1, estimators=("hvp",), rtol=1e-10,
                  max_hvps=500, optimizer=optimizer)  # fmt: skip
    beta1 = options.get("betas", (0.9, 0.999))[0]
    negative_dominates = []
    for step in range(8):
        expected, largest_magnitude = (
            dense_preconditioned_sharpness(model, loss_fn, batches, optimizer)
            if step
            else (None, None)
        )
        negative_dominates.append(largest_magnitude is not None and largest_magnitude < 0)
        probe.before_step(step)
        optimizer.zero_grad()
        loss_fn(model, batches[step % len(batches)]).backward()
        optimizer.step()
        record = probe.after_step()
        assert record.stability_kind == kind_code("adam")
        assert record.stability_threshold == pytest.approx(
            (2 + 2 * beta1) / ((1 - beta1) * options["lr"]), rel=1e-12
        )
        if expected is None:  # before Adam's first update there is no P
            assert math.isnan(record.preconditioned_sharpness)
            assert record.preconditioned_hvp_count == 0
            continue
        assert record.preconditioned_converged
        assert record.preconditioned_sharpness == pytest.approx(expected, rel=1e-6)
        # P^-1 rescales H by orders of magnitude: not the Hessian's own eigenvalue.
        assert abs(record.preconditioned_sharpness) > 10 * record.hessian_norm
    # The second, shifted solve was exercised: a negative eigenvalue had the largest magnitude.
    assert any(negative_dominates)


def test_probing_adam_is_invisible_to_training():
    """The preconditioned solve reads the optimizer's state and never changes it: parameters
    and AdamW's state are bit for bit those of the same loop without a probe."""
    finals = []
    for probed in (True, False):
        _, model, loss_fn, batches = small_models()[0]
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        probe = Probe(model, loss_fn, batches, every=1, optimizer=optimizer)
        for step in range(6):
            if probed:
                probe.before_step(step)
            optimizer.zero_grad()
            loss_fn(model, batches[step % len(batches)]).backward()
            optimizer.step()
            if probed:
                record = probe.after_step()
                assert (step == 0) == math.isnan(record.preconditioned_sharpness)
        state = [optimizer.state[p][key].clone() for p in model.parameters()
                 for key in ("exp_avg", "exp_avg_sq", "step")]  # fmt: skip
        finals.append(([p.detach().clone() for p in model.parameters()], state))
    (probed_params, probed_state), (plain_params, plain_state) = finals
    for a, b in zip(probed_params + probed_state, plain_params + plain_state):
        assert torch.equal(a, b)


def test_no_preconditioned_sharpness_without_adam():
    _, model, loss_fn, batches = small_models()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    probe = Probe(model, loss_fn, batches, every=1, estimators=("hvp",), optimizer=optimizer)
    for step in range(2):
        probe.before_step(step)
        optimizer.zero_grad()
        loss_fn(model, batches[0]).backward()
        optimizer.step()
        record = probe.after_step()
        assert math.isnan(record.preconditioned_sharpness)
        assert record.stability_kind == kind_code("momentum")
        assert record.stability_threshold == pytest.approx(3.0 / 0.1)


def test_preconditioner_is_zero_where_the_optimizer_does_not_move():
    model = torch.nn.Linear(2, 1).double()
    optimizer = torch.optim.Adam([model.weight], lr=0.1)  # the bias is not optimized
    assert adam_inverse_sqrt_preconditioner(optimizer, list(model.parameters())) is None
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    optimizer.step()
    scale = adam_inverse_sqrt_preconditioner(optimizer, list(model.parameters()))
    assert scale.shape == (3,) and scale[2] == 0 and bool(torch.all(scale[:2] > 0))


def test_thresholds():
    assert stability_threshold("sgd", 0.5) == 4.0
    assert stability_threshold("momentum", 0.1, momentum=0.9) == pytest.approx(38.0)
    assert stability_threshold("adam", 0.001) == pytest.approx(38_000.0)
    assert stability_threshold("adam", 0.1, beta1=0.0) == pytest.approx(20.0)  # RMSProp-like
    assert math.isnan(stability_threshold("sgd", 0.0))
    with pytest.raises(ValueError, match="lion"):
        stability_threshold("lion", 0.1)


def test_optimizer_stability_of_optimizers():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    SGD = torch.optim.SGD
    assert optimizer_stability(SGD(parameters, lr=0.1)) == ("sgd", pytest.approx(20.0))
    assert optimizer_stability(SGD(parameters, lr=0.1, momentum=0.9))[0] == "momentum"
    for no_formula in (
        SGD(parameters, lr=0.1, momentum=0.9, nesterov=True),
        SGD(parameters, lr=0.1, momentum=0.9, dampening=0.5),
        torch.optim.RMSprop(parameters, lr=0.1),
        SGD([{"params": parameters[:1]}, {"params": [torch.nn.Parameter(torch.zeros(1))],
                                          "lr": 0.2}], lr=0.1),
    ):  # fmt: skip
        kind, threshold = optimizer_stability(no_formula)
        assert kind is None and math.isnan(threshold)
    assert optimizer_stability(None)[0] is None


def test_edge_of_stability_from_the_probe_columns():
    steps = np.arange(0, 40, 4)
    threshold = np.full(len(steps), 380.0)
    sharpness = np.linspace(10.0, 400.0, len(steps))
    sharpness[0] = math.nan  # Adam's first probe
    probes = {"step": steps, "hessian_norm": sharpness / 50,
              "preconditioned_sharpness": sharpness, "stability_threshold": threshold,
              "stability_kind": np.full(len(steps), kind_code("adam"))}  # fmt: skip
    view = edge_of_stability(probes, {}, {"optimizer": "sgd"})
    assert view.kind == "adam" and view.column == "preconditioned_sharpness"
    late = math.ceil(LATE_SHARE * 9)
    assert view.late_steps == (int(steps[-late]), 36)
    assert view.late_ratio == pytest.approx(float(np.median(sharpness[-late:] / 380.0)))


def test_edge_of_stability_of_an_sgd_file_without_the_columns():
    """Files written before the threshold column: the run's --optimizer and train/lr."""
    probes = {"step": np.array([0, 5, 10]), "hessian_norm": np.array([1.0, 2.0, 3.0])}
    train = {"step": np.arange(11), "lr": np.where(np.arange(11) < 10, 0.5, 0.25)}
    view = edge_of_stability(probes, train, {"optimizer": "sgd"})
    assert view.kind == "sgd" and view.column == "hessian_norm"
    assert view.threshold.tolist() == [4.0, 4.0, 8.0]
    assert view.late_ratio == pytest.approx(3.0 / 8.0) and view.late_threshold == 8.0
    # Adam without the preconditioned column: its threshold does not bound H; no view.
    assert edge_of_stability(probes, train, {"optimizer": "adam"}) is None
    assert edge_of_stability(probes, {}, {"optimizer": "sgd"}) is None
    assert set(KINDS) == {"sgd", "momentum", "adam"}


@pytest.mark.usefixtures("clean_sys_path")
def test_run_fit_and_plot_show_the_edge_of_stability(tmp_path):
    from typer.testing import CliRunner

    from smoothprof.cli import app
    from smoothprof.trajectory import read_trajectory

    runner = CliRunner()
    out = tmp_path / "adam.h5"
    model_file = Path(__file__).parent / "assets" / "good_minimal.py"
    result = runner.invoke(app, ["run", str(model_file), "-o", str(out), "--steps", "30",
                                 "--optimizer", "adam", "--lr", "0.05", "--probe-every", "3"])
    assert result.exit_code == 0, result.output
    probes = read_trajectory(out).probes
    assert math.isnan(probes["preconditioned_sharpness"][0])
    assert np.isfinite(probes["preconditioned_sharpness"][1:]).all()
    assert (probes["preconditioned_hvp_count"][1:] > 0).all()
    assert np.allclose(probes["stability_threshold"], 38 / 0.05)
    data = json.loads(runner.invoke(app, ["fit", str(out), "--json"]).stdout)
    [view] = data["edge_of_stability"]
    assert view["optimizer"] == "adam" and view["sharpness"] == "preconditioned_sharpness"
    assert view["late_ratio"] > 0 and "Cohen" in view["source"]
    fit = runner.invoke(app, ["fit", str(out), "--width", "100", "--no-plot"])
    assert "edge of stability" in fit.stdout and "Cohen et al. (2022)" in fit.stdout
    plot = runner.invoke(app, ["plot", str(out), "--width", "80", "--ascii"])
    assert "edge of stability (Adam; late probes at" in plot.stdout
    assert "threshold (2 + 2 beta1) / ((1 - beta1) lr)" in plot.stdout
    # The HTML report's series figure has the same panel.
    pytest.importorskip("matplotlib")
    from smoothprof.report import series_figure

    figure = series_figure(read_trajectory(out))
    [axes] = [a for a in figure.axes if a.get_ylabel() == "sharpness / edge of stability"]
    assert [line.get_label() for line in axes.get_lines()] == [
        "top eig. of P^-1 H (Adam's P)",
        "threshold (2 + 2 beta1) / ((1 - beta1) lr)",
    ]
