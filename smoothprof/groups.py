"""Parameter groups for per-layer smoothness: which trainable parameters each group holds.

A group is a named set of the model's trainable parameters; the per-layer probe measures, for
each, the norm of the group's gradient and the top eigenvalue of the Hessian's diagonal block
for the group's parameters. Groups are given as fnmatch patterns over the names of
``model.named_parameters()``, or chosen by ``default_group_patterns``:

- every parameter registered on the model itself is a group of its own (the linear RNN's
  ``W_x``, ``W_h``, ``W_o``), and every top-level child module with trainable parameters is one
  (a ``Sequential``'s numbered blocks ``0``, ``2``, ...);
- a ``ModuleList`` child is not a block but a list of them: each of its blocks is a group
  (a transformer's ``h.0``, ``h.1``, ...);
- a model whose only parameters sit in one child (a wrapper) is grouped as that child is.

A parameter belongs to the first group with a pattern that matches its name; parameters that
no pattern matches form the group ``rest``, so that the groups always split the parameters. A
pattern that matches no parameter is an error: a typo must not pass as a group of nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError

REST = "rest"
"""The group of the parameters that no given pattern matches."""

GroupSpec = str | Sequence[str] | Mapping[str, str | Sequence[str]]
"""Groups as a user gives them: ``"name=pattern,name=pattern"`` (a name may repeat to add a
pattern; an entry without ``=`` is its own name), a list of such entries, or a mapping from
name to a pattern or a list of patterns."""


@dataclass(frozen=True)
class ParameterGroup:
    """One group: its ``name``, the ``patterns`` that select it, the names of its parameters,
    their positions in the list of trainable parameters (``model.parameters()`` order) and its
    number of scalars."""

    name: str
    patterns: tuple[str, ...]
    parameter_names: tuple[str, ...]
    indices: tuple[int, ...]
    size: int


def group_patterns(spec: GroupSpec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(name, patterns)`` pairs in the order given, from any ``GroupSpec``.

    >>> group_patterns("recurrent=W_h,io=W_x,io=W_o")
    (('recurrent', ('W_h',)), ('io', ('W_x', 'W_o')))
    >>> group_patterns({"embed": ["wte.*", "wpe.*"], "head": "lm_head.*"})
    (('embed', ('wte.*', 'wpe.*')), ('head', ('lm_head.*',)))
    """
    entries: list[tuple[str, str]] = []
    if isinstance(spec, Mapping):
        for name, patterns in spec.items():
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(name, str) or not isinstance(patterns, Sequence):
                raise ConfigError(f"groups: {name!r}: give a pattern or a list of patterns")
            entries += [(name, pattern) for pattern in patterns]
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(f"groups: {item!r} is not a 'name=pattern' text")
            name, _, pattern = item.partition("=")
            entries.append((name, pattern) if pattern.strip() else (name, name))
    pairs: dict[str, list[str]] = {}
    for name, pattern in entries:
        name, pattern = name.strip(), str(pattern).strip()
        if not name or not pattern:
            raise ConfigError(f"groups: an empty group name or pattern in {spec!r}")
        if any(mark in name for mark in "=,"):
            raise ConfigError(f"groups: the name {name!r} may not hold '=' or ','")
        pairs.setdefault(name, []).append(pattern)
    if not pairs:
        raise ConfigError("groups: no group given")
    if REST in pairs:
        raise ConfigError(f"groups: {REST!r} is the name of the parameters no pattern matches")
    return tuple((name, tuple(patterns)) for name, patterns in pairs.items())


def group_entries(spec: GroupSpec) -> tuple[str, ...]:
    """The spec as ``name=pattern`` texts, one per pattern: how a run's config records it."""
    return tuple(f"{name}={p}" for name, patterns in group_patterns(spec) for p in patterns)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def default_group_patterns(model: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The default groups of ``model`` (module docstring) as ``(name, patterns)`` pairs."""
    module, prefix = model, ""
    while True:
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        children = [(n, c) for n, c in module.named_children() if _trainable(c)]
        if own or len(children) != 1 or isinstance(children[0][1], nn.ModuleList):
            break
        name, module = children[0]
        prefix += name + "."
    pairs = [(prefix + name, (prefix + name,)) for name in own]
    for name, child in children:
        blocks = [(name, child)]
        if isinstance(child, nn.ModuleList):
            blocks = [(f"{name}.{n}", c) for n, c in child.named_children() if _trainable(c)]
        for block_name, _ in blocks:
            pairs.append((prefix + block_name, (f"{prefix}{block_name}.*",)))
    return tuple(pairs)


def resolve_groups(model: nn.Module, spec: GroupSpec | None = None) -> list[ParameterGroup]:
    """The groups of ``model``'s trainable parameters that ``spec`` names (None: the default
    groups), each parameter in the first group whose pattern matches, the rest in ``rest``.

    Raises ConfigError for a pattern that matches no trainable parameter.
    """
    pairs = default_group_patterns(model) if spec is None else group_patterns(spec)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no parameters with requires_grad=True")
    members: dict[str, list[int]] = {name: [] for name, _ in pairs}
    rest: list[int] = []
    for index, (parameter_name, _) in enumerate(named):
        for name, patterns in pairs:
            if any(fnmatch.fnmatchcase(parameter_name, pattern) for pattern in patterns):
                members[name].append(index)
                break
        else:
            rest.append(index)
    unmatched = [
        pattern
        for _, patterns in pairs
        for pattern in patterns
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named)
    ]
    if unmatched:
        shown = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
        raise ConfigError(
            f"groups: the pattern(s) {', '.join(unmatched)} match no trainable parameter "
            f"(its names: {shown})"
        )
    empty = [name for name, _ in pairs if not members[name]]
    if empty:  # every pattern matched, but earlier groups took all they matched
        raise ConfigError(
            f"groups: {', '.join(empty)} hold no parameter: the parameters their patterns "
            "match belong to an earlier group (a parameter joins the first group that matches)"
        )
    groups = [_group(name, patterns, members[name], named) for name, patterns in pairs]
    if rest:
        groups.append(_group(REST, ("*",), rest, named))
    return groups


def _group(
    name: str, patterns: tuple[str, ...], indices: list[int], named: list[tuple[str, Any]]
) -> ParameterGroup:
    return ParameterGroup(
        name=name,
        patterns=patterns,
        parameter_names=tuple(named[i][0] for i in indices),
        indices=tuple(indices),
        size=sum(named[i][1].numel() for i in indices),
    )


def group_layout(groups: Sequence[ParameterGroup]) -> list[dict[str, Any]]:
    """The groups as the trajectory file records them (JSON): name, patterns, parameters,
    size."""
    return [
        {
            "name": g.name,
            "patterns": list(g.patterns),
            "parameters": list(g.parameter_names),
            "size": g.size,
        }
        for g in groups
    ]
