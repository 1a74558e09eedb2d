"""Parameter groups, and the per-layer probe against exact dense float64 block Hessians."""

import math

import pytest
import torch
from conftest import dense_hessian, top_eigenvalue
from torch import nn

from smoothprof import Probe, hessian_norm
from smoothprof.errors import ConfigError
from smoothprof.groups import (
    REST,
    default_group_patterns,
    group_entries,
    group_patterns,
    resolve_groups,
)
from smoothprof.objective import EXACT_HVP_METHODS
from smoothprof.probe import group_coordinates, hessian_block_norms


class Direct(nn.Module):
    """Parameters on the model itself, as the linear RNN's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(2, 3))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)


class Wrapped(nn.Module):
    """A lone wrapper child holding a ModuleList of blocks and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.embed = nn.Embedding(4, 2)
        self.inner.blocks = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)])
        self.inner.norm = nn.LayerNorm(2)


def test_default_groups_follow_the_model_structure():
    sequential = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    assert default_group_patterns(sequential) == (("0", ("0.*",)), ("2", ("2.*",)))
    assert default_group_patterns(Direct()) == (("a", ("a",)), ("b", ("b",)))
    assert [name for name, _ in default_group_patterns(Wrapped())] == [
        "inner.embed", "inner.blocks.0", "inner.blocks.2", "inner.norm",
    ]  # fmt: skip


def test_resolved_groups_split_the_trainable_parameters():
    model = Wrapped()
    groups = resolve_groups(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n for g in groups for n in g.parameter_names) == sorted(names)
    assert sum(g.size for g in groups) == sum(p.numel() for p in model.parameters())
    blocks = resolve_groups(model, "blocks=inner.blocks.*")
    assert [g.name for g in blocks] == ["blocks", REST]
    assert blocks[0].parameter_names == (
        "inner.blocks.0.weight", "inner.blocks.0.bias", "inner.blocks.2.weight",
        "inner.blocks.2.bias",
    )  # fmt: skip
    assert Direct().frozen.requires_grad is False
    assert [g.parameter_names for g in resolve_groups(Direct())] == [("a",), ("b",)]


def test_group_specs_in_every_form_mean_the_same():
    as_text = group_patterns("embed=wte.*,embed=wpe.*,head")
    as_mapping = group_patterns({"embed": ["wte.*", "wpe.*"], "head": "head"})
    as_list = group_patterns(["embed=wte.*", "embed=wpe.*", "head=head"])
    assert as_text == as_mapping == as_list == (
        ("embed", ("wte.*", "wpe.*")), ("head", ("head",)),
    )  # fmt: skip
    assert group_entries(as_mapping and {"x": ["a", "b"]}) == ("x=a", "x=b")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("w=nothing*", "match no trainable parameter"),
        ("all=*,late=b", "hold no parameter"),
        ("rest=a", "'rest' is the name"),
        ("=a", "empty group name"),
        ({"x": 3}, "give a pattern"),
    ],
)
def test_a_group_spec_that_cannot_work_is_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_groups(Direct(), spec)


class Mixed(nn.Module):
    """Two blocks of opposite character: a's diagonal block is dominated by its negative
    eigenvalue (-4 plus a small coupling term), b's is positive; they are coupled through the
    tanh term, so the off-diagonal blocks are not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coupling = (torch.tanh(x @ self.a) * (x @ self.b.T).sum(dim=1)).mean()
        return -2.0 * (self.a**2).sum() + coupling + 0.5 * (self.b**2).sum()


def _mixed_model():
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(16, 3, dtype=torch.float64)
    return model, lambda m, batch: m(batch), [x, x[:8]]


def _mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, y)]


@pytest.mark.parametrize("make", [_mixed_model, _mlp], ids=["mixed-signs", "mlp"])
@pytest.mark.parametrize("method", EXACT_HVP_METHODS)
def test_block_norms_match_dense_block_hessians_and_interlace(make, method):
    model, loss, batches = make()
    hessian = dense_hessian(model, loss, batches)
    whole = top_eigenvalue(hessian)
    parameters = [p for p in model.parameters() if p.requires_grad]
    blocks = hessian_block_norms(
        model, loss, batches, rtol=1e-8, hvp_method=method, retain_graphs=True
    )
    groups = resolve_groups(model)
    assert list(blocks) == [g.name for g in groups]
    for group in groups:
        where = group_coordinates(parameters, group)
        exact = top_eigenvalue(hessian[where][:, where])
        result = blocks[group.name]
        assert result.converged
        assert abs(result.eigenvalue - exact) <= 1e-8 * abs(exact), group.name
        # Cauchy interlacing: a principal submatrix's spectral norm is at most the matrix's.
        assert abs(exact) <= abs(whole) * (1 + 1e-12)
        assert result.value <= hessian_norm(model, loss, batches, rtol=1e-8).value * (1 + 1e-8)
    if make is _mixed_model:  # the negative-dominated block keeps its sign
        assert blocks["a"].eigenvalue < 0 < blocks["b"].eigenvalue


def test_non_contiguous_groups_use_the_right_coordinates():
    model, loss, batches = _mlp()
    hessian = dense_hessian(model, loss, batches)
    groups = resolve_groups(model, "weights=*.weight")  # 0.weight and 2.weight: not contiguous
    parameters = list(model.parameters())
    where = group_coordinates(parameters, groups[0])
    assert isinstance(where, torch.Tensor) and where.numel() == 3 * 4 + 4 * 2
    blocks = hessian_block_norms(model, loss, batches, groups="weights=*.weight", rtol=1e-8)
    exact = top_eigenvalue(hessian[where][:, where])
    assert abs(blocks["weights"].eigenvalue - exact) <= 1e-8 * abs(exact)
    rest = group_coordinates(parameters, groups[1])
    exact_rest = top_eigenvalue(hessian[rest][:, rest])
    assert abs(blocks[REST].eigenvalue - exact_rest) <= 1e-7 * abs(exact_rest)


def test_probe_measures_each_group_warm_started_and_leaves_training_alone():
    model, loss, batches = _mixed_model()
    reference, _, _ = _mixed_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer_ref = torch.optim.SGD(reference.parameters(), lr=0.01)
    probe = Probe(model, loss, batches, every=1, groups="default", rtol=1e-6, estimators=("hvp",))
    for step in range(4):
        with probe.around_step(step):
            optimizer.zero_grad()
            loss(model, batches[0]).backward()
            optimizer.step()
        optimizer_ref.zero_grad()
        loss(reference, batches[0]).backward()
        optimizer_ref.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)
    records = probe.records
    assert [[g.group for g in r.groups] for r in records] == [["a", "b"]] * 4
    for record in records:
        for measured in record.groups:
            assert measured.hessian_converged
            assert measured.hessian_norm <= record.hessian_norm * (1 + 1e-5)
            assert measured.grad_norm <= record.grad_norm * (1 + 1e-12)
        squares = sum(g.grad_norm**2 for g in record.groups)
        assert math.isclose(math.sqrt(squares), record.grad_norm, rel_tol=1e-12)
        assert record.group_hvp_count == sum(g.hvp_count for g in record.groups)


def test_each_group_is_warm_started_from_its_previous_eigenvector():
    model, loss, batches = _mlp()
    probe = Probe(model, loss, batches, every=1, groups="default", estimators=("hvp",))
    for step in range(2):  # no update: the second probe measures at the same point
        probe.before_step(step)
        probe.after_step(update_made=False)
    first, second = probe.records
    assert all(b.hvp_count < a.hvp_count for a, b in zip(first.groups, second.groups))
    assert all(g.hvp_count <= 2 for g in second.groups)
    for a, b in zip(first.groups, second.groups):
        assert math.isclose(a.hessian_norm, b.hessian_norm, rel_tol=1e-3)


def test_probe_groups_need_the_hvp_estimator():
    model, loss, batches = _mlp()
    with pytest.raises(ValueError, match="needs the 'hvp' estimator"):
        Probe(model, loss, batches, estimators=("fd",), groups="default")
    assert Probe(model, loss, batches).parameter_groups == []
