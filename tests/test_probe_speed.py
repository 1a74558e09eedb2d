"""The peers' side of benchmarks/probe_speed.py: the step count it gives hessian-eigenthings (the
smallest that reaches the error asked, an oracle in the peer's favour), and how a peer that
fails is reported instead of stopping the benchmark."""

import pytest
import torch
from conftest import benchmark_module, dense_hessian, top_eigenvalue
from torch import nn


@pytest.fixture(scope="module")
def probe_speed():
    yield from benchmark_module("probe_speed")


def test_a_peer_that_fails_as_is_runs_with_math_attention_or_is_reported(probe_speed):
    def failing():
        raise RuntimeError("derivative for aten::_scaled_dot_product_flash_attention")

    def working():
        return 2.5, 7

    run = probe_speed.PeerRun("peer", failing, note="12 for 1e-07")
    run.first(working)
    assert (run.eigenvalue, run.hvps, run.solve) == (2.5, 7, working)
    assert run.note == "12 for 1e-07, with math attention"
    run.timed()
    assert len(run.seconds) == 1

    run = probe_speed.PeerRun("peer", failing)
    run.first(failing)
    assert run.solve is None and run.note == "fails (RuntimeError)"
    run.timed()  # a failed peer is not timed
    assert run.seconds == []


def test_the_oracle_step_count_of_hessian_eigenthings_is_the_smallest_within_the_error(
    probe_speed,
):
    eigenthings = pytest.importorskip("hessian_eigenthings")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    batch = (torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,)))
    exact = abs(top_eigenvalue(dense_hessian(model, probe_speed.cross_entropy, [batch])))
    errors = (1e-3, 1e-8)
    # a hint of 3 steps: the search goes on to 50 when that does not suffice
    found = probe_speed.eigenthings_smallest_max_iters(model, batch, exact, errors, False, 3)
    assert 3 < found[0] < found[1]

    def error_at(max_iter: int) -> float:
        operator = probe_speed.eigenthings_operator(model, batch)
        result = eigenthings.lanczos(
            operator, k=1, max_iter=max_iter, seed=probe_speed.START_SEED
        )
        return abs(abs(float(result.eigenvalues[0])) - exact) / exact

    for error, steps in zip(errors, found):
        assert error_at(steps) <= error
        assert error_at(steps - 1) > error
