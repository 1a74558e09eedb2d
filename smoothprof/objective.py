"""The probe objective f(x) = mean over fixed batches of loss(model, batch), and its derivatives.

Everything here is a function of the model's trainable parameters as they are when called. The
derivatives use ``torch.autograd.grad``, so ``.grad`` attributes are never touched. Each batch is
evaluated with its own fixed seed, so dropout draws the same mask in every evaluation and f is one
function; callers that must leave the global RNG untouched wrap calls in ``preserved_rng``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .distributed import Communicator, local_indices

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters f depends on: those with ``requires_grad``, in ``parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector from a list of tensors (parameters, gradients)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    sizes = [t.numel() for t in like]
    return [chunk.view_as(t) for chunk, t in zip(torch.split(vector, sizes), like, strict=True)]


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Restore the global torch (CPU and CUDA), numpy and Python RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda" and torch.cuda.is_available()
        else None
    )
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def double_backward_backends(device: torch.device) -> Iterator[None]:
    """Kernels that have a double backward, and a fast one: cuDNN off (its RNNs have none), math
    attention, and ``ProbeKernels`` (batch norm and CPU LSTMs from cheaper pieces). The probe
    evaluates f only in here, so every value it compares is the same function."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - torch without the attention module
            pass
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(ProbeKernels())
        yield


_BATCH_NORM_SIGNATURE = inspect.signature(nn.functional.batch_norm)
_FLOATS = (torch.float32, torch.float64)
_VF_LSTM = torch._VF.lstm


def batch_norm_from_statistics(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Train-mode batch norm, ``(x - mean) / sqrt(var + eps) * weight + bias`` with the batch's
    per-channel mean and biased variance, written as ``x * scale + shift`` with per-channel
    ``scale`` and ``shift``: one full-size multiply-add after ``torch.var_mean``."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(shape)
    return torch.addcmul(shift, x, scale)


def lstm_from_cells(
    x: torch.Tensor,
    hx: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    has_biases: bool,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch._VF.lstm`` (what ``nn.LSTM`` calls; no projections, no dropout) from its cell
    equations: per layer and direction one product for the input of every time step, then per
    step ``gates = x W_ih' + h W_hh' + b``, ``c = sigmoid(f) c + sigmoid(i) tanh(g)``,
    ``h = sigmoid(o) tanh(c)``. Returns ``(output, h_n, c_n)`` as ``_VF.lstm`` does."""
    h0, c0 = hx
    layer_input = x.transpose(0, 1) if batch_first else x  # (time, batch, features)
    directions = 2 if bidirectional else 1
    per_direction = 4 if has_biases else 2
    last_h, last_c = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w_ih, w_hh, *biases = weights[index * per_direction : (index + 1) * per_direction]
            bias = biases[0] + biases[1] if biases else None
            inputs = nn.functional.linear(layer_input, w_ih, bias).unbind(0)
            if direction == 1:
                inputs = inputs[::-1]
            h, c, w_hh_t = h0[index], c0[index], w_hh.t()
            hs = []
            for step_input in inputs:
                i, f, g, o = torch.addmm(step_input, h, w_hh_t).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                hs.append(h)
            if direction == 1:
                hs.reverse()
            outputs.append(torch.stack(hs))
            last_h.append(h)
            last_c.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    return output, torch.stack(last_h), torch.stack(last_c)


def hardsigmoid_from_clamp(x: torch.Tensor) -> torch.Tensor:
    """``F.hardsigmoid``, relu6(x + 3) / 6, from ``torch.clamp``: ATen's own kernel has no
    double backward ("derivative for aten::hardsigmoid_backward is not implemented")."""
    return torch.clamp(x + 3, 0, 6) / 6


def hardswish_from_clamp(x: torch.Tensor) -> torch.Tensor:
    """``F.hardswish``, x relu6(x + 3) / 6, from ``torch.clamp``, for the same reason."""
    return x * hardsigmoid_from_clamp(x)


class ProbeKernels(TorchFunctionMode):
    """The probe's own pieces for ATen kernels whose double backward is slow or missing.

    - Train-mode ``F.batch_norm`` as ``batch_norm_from_statistics``: ATen's batch-norm double
      backward runs many full-size products; in ``benchmarks/probe_speed.py`` the CNN's HVP drops
      from about 2.4 to 1.6 gradients. Running statistics are not updated (the probe restores
      them anyway).
    - ``nn.LSTM`` on the CPU as ``lstm_from_cells``: ATen's differentiable LSTM slices every
      time step out of the whole sequence, and autograd pays for each slice with a zero-filled
      tensor of the sequence's size; the benchmark's char-LSTM HVP drops from about 8.5 to 6.5
      gradients.
    - ``F.hardsigmoid`` and ``F.hardswish`` (MobileNetV3's activations) from ``torch.clamp``:
      ATen's have no double backward at all. An in-place call returns the value and leaves its
      input as it was (``nn.Hardswish(inplace=True)`` uses the value it returns).

    The same functions up to rounding (tests hold them to 1e-12 of ATen's in float64). Anything
    else goes to ATen as it is: eval-mode batch norm, dtypes other than float32 / float64 (ATen
    accumulates half precision in float32), a batch of one value per channel (ATen raises);
    LSTMs on other devices (measured on the CPU only), with projections, dropout between layers
    in training, packed sequences or no time steps.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.hardsigmoid or func is nn.functional.hardswish:
            x = args[0] if args else kwargs["input"]
            if x.dtype in _FLOATS:
                if func is nn.functional.hardsigmoid:
                    return hardsigmoid_from_clamp(x)
                return hardswish_from_clamp(x)
        elif func is nn.functional.batch_norm:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            x = arguments["input"]
            if (
                arguments["training"]
                and x.dtype in _FLOATS
                and x.dim() >= 2
                and x.numel() > x.shape[1]
            ):
                return batch_norm_from_statistics(
                    x, arguments["weight"], arguments["bias"], arguments["eps"]
                )
        elif func is _VF_LSTM and not kwargs and len(args) == 9:
            x, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first = (
                args
            )
            directions = 2 if bidirectional else 1
            if (
                isinstance(hx, (list, tuple))  # not a packed sequence's batch sizes
                and x.device.type == "cpu"
                and x.dtype in _FLOATS
                and x.dim() == 3
                and x.shape[1 if batch_first else 0] > 0
                and len(weights) == num_layers * directions * (4 if has_biases else 2)
                and (dropout == 0 or not train or num_layers == 1)
            ):
                return lstm_from_cells(
                    x, hx, weights, has_biases, num_layers, bidirectional, batch_first
                )
        return func(*args, **kwargs)


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap in
    parameter values under the names ``model.<name>``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model, self.batch)


HVP_METHODS = ("retained", "double-backward", "forward-over-reverse", "finite-difference")
"""How a Hessian-vector product is taken, fastest first where each works:

- ``retained``: one more backward pass through the double-backward graph kept from the gradient
  (memory of every probe batch's graph at once);
- ``double-backward``: the graph rebuilt batch by batch for every product (memory of one batch);
- ``forward-over-reverse``: ``torch.func.jvp`` of ``torch.func.grad`` (no graph kept; fails for
  CPU LSTMs and some fused kernels);
- ``finite-difference``: the central difference of two gradients along the vector (see
  ``finite_difference_hvp_step``), for models that cannot be differentiated twice. Not exact:
  its relative error is about ``FINITE_DIFFERENCE_HVP_RTOL`` of the dtype, measured.
"""

EXACT_HVP_METHODS = HVP_METHODS[:-1]
"""The methods that differentiate twice: exact up to rounding."""

FINITE_DIFFERENCE_HVP_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
"""A bound on the relative error ||H v - FD(v)|| / ||H v|| of the finite-difference HVP that
tests/test_probe.py holds on its small models against the dense float64 Hessian; the worst
measured there was 1.4e-10 in float64 and 1.0e-4 in float32 (the LSTM), and 1.4e-4 in float32
on a 51k-parameter CNN with Hardswish, whose kinks a step can cross. Models with ReLU are the
exception (``finite_difference_hvp_step``)."""


def finite_difference_hvp_step(point_scale: float, vector_norm: float, dtype: torch.dtype) -> float:
    """The step h of the central difference (g(x + h v) - g(x - h v)) / (2 h).

    Its error has two parts: the truncation, about (h ||v||)^2 times the third derivative along
    v, and rounding: x + h v is stored in the parameters' dtype, each coordinate rounded to
    eps |x_i|, and the gradients carry their own rounding. What the rounding of x does to the
    product is the rounding along v, eps ||v * x|| / ||v|| (``point_scale``: the parameters'
    magnitude weighted by v's components), not eps ||x||: parameters that v hardly moves, such
    as an embedding table beside the direction of sharpest curvature, do not count. A step of
    length h ||v|| = eps^(1/3) max(1, point_scale) balances the two (the textbook
    central-difference step, scaled so that it does not vanish in the parameters' rounding):
    2e-5 relative in float32, 4e-11 in float64, where the loss varies on the parameters' scale.

    Measured on the 0.5M-parameter transformer of benchmarks/models/transformer_lm_25m.py with
    GELU (||x|| = 186, almost all of it the N(0, 1) embedding table; point_scale 0.09 along
    the top eigenvector, 0.27 along a random direction), against the float64 double-backward
    product: a step of length eps^(1/3) ||x|| (0.9 in float32, as this rule was before) was off
    by 79% along the top eigenvector; lengths 0.003 to 0.01, where this rule puts float32's, by
    4e-5 to 2e-4 (along a random direction 5e-4 to 2e-3, of a product 30 times smaller). With
    ReLU no step is accurate: the gradient jumps where a unit's input crosses zero, so the
    difference of two gradients does not converge to the Hessian of the pieces that autograd
    differentiates (10% off at best, at length 0.1, and more at shorter steps, in float64 too).
    """
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3) * max(1.0, point_scale) / vector_norm


class ProbeObjective:
    """f(x) = (1/B) sum_b loss_fn(model, batch_b), with gradients and Hessian-vector products.

    The caller owns the model's state: this class evaluates at the current parameters, in the
    model's current train/eval mode, and does not restore buffers or RNG states itself (see
    ``probe.unchanged_model_state``). ``seed`` fixes the dropout masks: batch b is always evaluated
    right after ``torch.manual_seed(seed + b)``.

    ``hvp_method`` is one of ``HVP_METHODS`` or ``"auto"``: the first of them that works here.
    The ``retained`` method keeps every probe batch's double-backward graph in memory at once;
    ``retain_graphs=None`` allows that for a single batch only.

    With a communicator ``comm`` (several ranks), ``batches`` is the global list, the same on
    every rank: this rank evaluates the batches i with ``i % world_size == rank`` (each still
    seeded with ``seed + i``), and loss, gradient, spread and every HVP are summed over the ranks,
    so every rank gets f and its derivatives over all the batches.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        seed: int = 0,
        hvp_method: str = "auto",
        retain_graphs: bool | None = None,
        comm: Communicator | None = None,
    ) -> None:
        if len(batches) == 0:
            raise ValueError("the probe objective needs at least one batch")
        if hvp_method != "auto" and hvp_method not in HVP_METHODS:
            raise ValueError(
                f"hvp_method must be 'auto' or one of {HVP_METHODS}, got {hvp_method!r}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.seed = seed
        self.comm = comm
        self.local_indices = local_indices(len(self.batches), comm)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters with requires_grad=True")
        self.parameter_names = [n for n, _ in named]
        self.parameters = [p for _, p in named]
        self.retain_graphs = len(self.batches) == 1 if retain_graphs is None else retain_graphs
        if hvp_method == "retained" and not self.retain_graphs:
            raise ValueError("hvp_method 'retained' needs retain_graphs for several batches")
        self.hvp_method = hvp_method
        self.num_hvps = 0
        self._retained: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device

    def _seed_batch(self, index: int) -> None:
        torch.manual_seed(self.seed + index)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(self.seed + index)

    def _batch_gradient(self, index: int, create_graph: bool) -> tuple[float, list[torch.Tensor]]:
        self._seed_batch(index)
        loss = self.loss_fn(self.model, self.batches[index])
        grads = torch.autograd.grad(
            loss, self.parameters, create_graph=create_graph, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.parameters)]
        return float(loss.detach()), grads

    def gradient(self, *, create_graph: bool = False) -> tuple[float, torch.Tensor, float]:
        """f(x), grad f(x) (flat) and the per-batch gradient spread sqrt(mean_b ||g_b - g||^2).

        The spread is accumulated with Welford's update, so memory stays at two flat vectors
        whatever the number of batches. With ``create_graph`` the double-backward graph is kept
        for ``retained`` HVPs, when the method and the memory allowance permit.
        """
        if self.comm is not None:
            return self._global_gradient(create_graph)
        keep = create_graph and self.retain_graphs and self.hvp_method in ("auto", "retained")
        total_loss, total, _, squares = self._sum_over_batches(range(len(self.batches)), keep)
        count = len(self.batches)
        mean = [g / count for g in total]
        self._retained = mean if keep else None
        flat_mean = flatten([g.detach() for g in mean])
        return total_loss / count, flat_mean, math.sqrt(max(squares, 0.0) / count)

    def _sum_over_batches(
        self, indices: Sequence[int], keep: bool
    ) -> tuple[float, list[torch.Tensor], torch.Tensor | None, float]:
        """Loss and gradient summed over the batches ``indices`` (zeros for none), the running
        mean of their flat gradients (None for none) and Welford's M2: the sum over the batches
        of ||g_b - running mean||^2, so memory stays at two flat vectors whatever their number."""
        total_loss = 0.0
        total: list[torch.Tensor] | None = None
        running_mean: torch.Tensor | None = None
        squares = 0.0
        for count, index in enumerate(indices, start=1):
            loss, grads = self._batch_gradient(index, create_graph=keep)
            total_loss += loss
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            flat = flatten([g.detach() for g in grads])
            if running_mean is None:
                running_mean = flat.clone()
                continue
            delta = flat - running_mean
            running_mean += delta / count
            squares += float(torch.dot(delta, flat - running_mean))
        if total is None:
            total = [torch.zeros_like(p) for p in self.parameters]
        return total_loss, total, running_mean, squares

    def _global_gradient(self, create_graph: bool) -> tuple[float, torch.Tensor, float]:
        """``gradient()`` over the batches of every rank: sums all-reduced, Welford states
        combined as Chan et al.'s parallel update, M2 = sum_r M2_r + sum_r n_r ||m_r - g||^2."""
        assert self.comm is not None
        keep = create_graph and self.retain_graphs and self.hvp_method in ("auto", "retained")
        if create_graph:
            # Every rank keeps its graphs or none does: the ranks must offer the same HVP
            # methods, whatever each decides from its own memory.
            keep = not self.comm.any(not keep)
        total_loss, total, running_mean, squares = self._sum_over_batches(self.local_indices, keep)
        count = len(self.batches)
        local = [g / count for g in total]  # this rank's share of the mean gradient
        self._retained = local if keep else None
        flat_mean = self.comm.all_reduce_sum(flatten([g.detach() for g in local]))
        spread = 0.0
        if running_mean is not None:
            spread = len(self.local_indices) * float(torch.sum((running_mean - flat_mean) ** 2))
        loss_sum, squares_sum = self.comm.sum_floats(total_loss, squares + spread)
        return loss_sum / count, flat_mean, math.sqrt(max(squares_sum, 0.0) / count)

    def available_hvp_methods(self) -> list[str]:
        """The HVP methods this objective can try now, fastest first where each works."""
        methods = list(HVP_METHODS) if self.hvp_method == "auto" else [self.hvp_method]
        if self._retained is None and "retained" in methods:
            methods.remove("retained")
        return methods

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """The Hessian of f times a flat vector, one HVP (over all batches).

        With ``hvp_method="auto"`` the first call settles on the first method that works and
        keeps it; a method that raises is skipped, and only when all fail is the error raised.
        """
        self.num_hvps += 1
        if self.hvp_method != "auto":
            return self.hvp_with(self.hvp_method, vector)
        errors: list[Exception] = []
        for method in self.available_hvp_methods():
            try:
                product = self.hvp_with(method, vector)
            except Exception as error:  # a method that fails here is skipped, never fatal
                errors.append(error)
                continue
            self.hvp_method = method
            return product
        raise errors[0]

    def hvp_with(self, method: str, vector: torch.Tensor) -> torch.Tensor:
        """One HVP by the given method (see ``HVP_METHODS``), not counted in ``num_hvps``.

        With several ranks a method that fails on one rank fails on all, so they stay in step.
        """
        if self.comm is None:
            return self._local_hvp(method, vector)
        try:
            product, error = self._local_hvp(method, vector), None
        except Exception as raised:  # agreed on below: every rank raises or none does
            product, error = None, raised
        if self.comm.any(error is not None):
            raise error or RuntimeError(f"the HVP method {method!r} failed on another rank")
        assert product is not None
        return self.comm.all_reduce_sum(product)

    def _local_hvp(self, method: str, vector: torch.Tensor) -> torch.Tensor:
        """This rank's share of the HVP: all of it in a single process."""
        pieces = unflatten(vector.to(self.parameters[0].dtype), self.parameters)
        if method == "retained":
            if self._retained is None:
                raise RuntimeError("no retained graph: call gradient(create_graph=True) first")
            return self._grad_of_dot(self._retained, pieces, retain_graph=True)
        if method == "finite-difference":
            return self._finite_difference_hvp(vector.to(self.parameters[0].dtype))
        total: torch.Tensor | None = None
        for index in self.local_indices:
            if method == "double-backward":
                _, grads = self._batch_gradient(index, create_graph=True)
                product = self._grad_of_dot(grads, pieces, retain_graph=False)
            elif method == "forward-over-reverse":
                product = self._forward_over_reverse(index, pieces)
            else:
                raise ValueError(f"unknown HVP method {method!r}")
            total = product if total is None else total + product
        if total is None:  # a rank without probe batches: its share is zero
            if method not in HVP_METHODS:
                raise ValueError(f"unknown HVP method {method!r}")
            return flatten([torch.zeros_like(p) for p in self.parameters])
        return total / len(self.batches)

    def _finite_difference_hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """This rank's share of (g(x + h v) - g(x - h v)) / (2 h), h from
        ``finite_difference_hvp_step``: two gradients per batch, each batch seeded as always, and
        the parameters restored bit for bit afterwards (copied back from a saved copy)."""
        vector_norm = float(torch.linalg.vector_norm(vector))
        if vector_norm == 0 or not self.local_indices:
            return flatten([torch.zeros_like(p) for p in self.parameters])
        saved = [p.detach().clone() for p in self.parameters]
        pieces = unflatten(vector, self.parameters)
        # ||v * x|| / ||v||, alike on every rank: every rank holds the same x and v.
        weighted = sum(float((x * v).square().sum()) for x, v in zip(saved, pieces))
        scale = math.sqrt(weighted) / vector_norm
        step = finite_difference_hvp_step(scale, vector_norm, vector.dtype)
        sums: list[torch.Tensor] = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for parameter, value, piece in zip(self.parameters, saved, pieces):
                        parameter.copy_(value + (sign * step) * piece)
                total: torch.Tensor | None = None
                for index in self.local_indices:
                    gradient = flatten(self._batch_gradient(index, create_graph=False)[1])
                    total = gradient if total is None else total + gradient
                assert total is not None
                sums.append(total)
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved):
                    parameter.copy_(value)
        return (sums[0] - sums[1]) / (2 * step * len(self.batches))

    def _forward_over_reverse(self, index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call, grad, jvp

        # Buffers go in as copies: torch.func refuses in-place updates of the real ones
        # (BatchNorm's running statistics in train mode).
        buffers = {f"model.{n}": b.detach() for n, b in self.model.named_buffers()}
        names = [f"model.{n}" for n in self.parameter_names]
        wrapper = _LossOf(self.model, self.loss_fn, self.batches[index])

        def loss_at(*values: torch.Tensor) -> torch.Tensor:
            self._seed_batch(index)
            copies = {name: b.clone() for name, b in buffers.items()}  # made inside the transform
            return functional_call(wrapper, {**copies, **dict(zip(names, values))}, ())

        primals = tuple(p.detach() for p in self.parameters)
        argnums = tuple(range(len(primals)))
        _, tangent = jvp(
            lambda *values: grad(loss_at, argnums=argnums)(*values), primals, tuple(pieces)
        )
        return flatten(list(tangent))

    def _grad_of_dot(
        self, grads: list[torch.Tensor], vector: list[torch.Tensor], *, retain_graph: bool
    ) -> torch.Tensor:
        pairs = [(g, v) for g, v in zip(grads, vector) if g.requires_grad]
        if not pairs:
            return flatten([torch.zeros_like(p) for p in self.parameters])
        products = torch.autograd.grad(
            [g for g, _ in pairs],
            self.parameters,
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return flatten(
            [torch.zeros_like(p) if h is None else h for h, p in zip(products, self.parameters)]
        )

    def release(self) -> None:
        """Free the retained double-backward graph."""
        self._retained = None


def saved_graph_bytes(model: nn.Module, loss_fn: LossFn, batch: Any, *, seed: int = 0) -> int:
    """The memory one batch's double-backward graph holds: bytes of the tensors autograd saves
    while taking the gradient with ``create_graph``, each storage counted once and the
    parameters' own storages not at all (they exist anyway).

    The caller owns the model's state, as for ``ProbeObjective`` (BatchNorm statistics move in
    train mode; wrap the call in ``probe.unchanged_model_state``).
    """
    parameters = trainable_parameters(model)
    counted = _SavedBytes(model)
    with counted:
        torch.manual_seed(seed)
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
        del loss, grads
    return counted.total


def saved_activation_bytes(model: nn.Module, loss_fn: LossFn, batch: Any, *, seed: int = 0) -> int:
    """The memory one batch's forward pass holds for a gradient (a training step's
    activations): bytes of the tensors autograd saves while evaluating the loss, counted as
    ``saved_graph_bytes`` counts them, under whatever kernels and autocast the caller runs it
    in. The caller owns the model's state."""
    counted = _SavedBytes(model)
    with counted:
        torch.manual_seed(seed)
        loss = loss_fn(model, batch)
        del loss
    return counted.total


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the tensors autograd saves inside it: each storage once, the
    model's parameters' storages not at all."""

    def __init__(self, model: nn.Module) -> None:
        self.owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[tuple[torch.device, int]] = set()
        self.total = 0
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.data_ptr() not in self.owned and key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return tensor
