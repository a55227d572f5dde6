"""Measures of sharpness of a trained model: m-sharpness, Hessian spectrum, loss landscapes.

Every function takes the same three things:

- ``model``: an ``nn.Module``; its trainable parameters (``requires_grad``) are the weights that
  are measured;
- ``loss_fn(outputs, targets) -> scalar``: e.g. ``torch.nn.functional.cross_entropy``;
- ``batches``: an iterable of ``(inputs, targets)`` pairs (a list, or a finite ``DataLoader``),
  read once per call (it is turned into a list). A measure over several batches is the plain mean
  of its per-batch values.

The model is left exactly as it was found: its weights and buffers (BatchNorm's running
statistics included) are restored bit for bit, its train/eval mode is kept (a BatchNorm layer in
training mode normalises with batch statistics during the measurement, as in training), and the
``.grad`` fields are not touched (gradients come from ``torch.autograd.grad``).

References:

- m-sharpness: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021, Section 4.1 and Appendix C.1; the adaptive ball of ASAM:
  Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks", ICML 2021.
- Hessian: Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994
  (Hessian-vector products); Hutchinson, "A stochastic estimator of the trace of the influence
  matrix", 1989; as used by PyHessian (Yao, Gholami, Keutzer, Mahoney, 2020).
- Loss landscapes: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural
  Nets", NeurIPS 2018 (filter normalisation, Section 4).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Any, Tensor]

__all__ = [
    "filter_normalized_direction",
    "hessian_max_eigenvalue",
    "hessian_trace",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
]


# -- helpers ----------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def _batch_list(batches: Iterable[Batch]) -> list[Batch]:
    out = list(batches)
    if not out:
        raise ValueError("batches is empty")
    return out


def _call(model: nn.Module, inputs: Any) -> Tensor:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Snapshots every parameter and buffer of ``model``, copies them back on exit (bit for bit,
    into the same tensors) and keeps the train/eval mode of every module."""
    with torch.no_grad():
        params = [(p, p.detach().clone()) for p in model.parameters()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, saved in params + buffers:
                tensor.copy_(saved)
        for module, mode in modes:
            module.training = mode


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(_dot(a, a))


def _batch_loss(model: nn.Module, loss_fn: LossFn, batch: Batch) -> Tensor:
    inputs, targets = batch
    return loss_fn(_call(model, inputs), targets)


# -- m-sharpness --------------------------------------------------------------------------------------


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rho: float,
    steps: int = 5,
    adaptive: bool = False,
    eta: float = 0.01,
    generator: torch.Generator | None = None,
) -> float:
    """The m-sharpness of ``model``: the mean over the batches (each of size ``m``) of

        max_{‖T⁻¹δ‖₂ ≤ ρ}  L_B(w + δ) − L_B(w),

    the loss increase at the worst point of the ball of radius ``rho`` around the weights
    (Foret et al., ICLR 2021, Section 4.1: with small ``m`` it correlates best with the
    generalisation gap). ``T = I`` for SAM's ball; with ``adaptive=True``, ``T = diag(|w| + eta)``
    is ASAM's scale-invariant ball (Kwon et al., ICML 2021).

    Algorithm: projected normalised gradient ascent in the coordinates ``z = T⁻¹δ``, started at
    ``z = 0``: ``steps`` times, ``z ← Π_ρ(z + ρ·ĝ)`` where ``ĝ`` is the unit gradient of
    ``L_B(w + Tz)`` with respect to ``z`` (``T·∇L``) and ``Π_ρ`` the projection onto the ball.
    The first step is SAM's (ASAM's) perturbation ``ρ·g/‖g‖``, so ``steps=1`` measures the
    sharpness that SAM's second pass sees. Where the gradient vanishes (a stationary point), the
    step goes in a random direction drawn from ``generator``. The value is the largest loss
    increase among the visited points, the centre included (so it is never negative); more
    steps find a worse point: on a quadratic ``½wᵀAw`` at ``w = 0`` the
    iteration is a power iteration and tends to ``½ρ²λ_max(A)``.

    Weights, buffers and mode are restored exactly afterwards; ``.grad`` is not touched.
    """
    if rho < 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batches = _batch_list(batches)
    params = [p for _, p in _named_params(model)]
    values = []
    with _preserved(model):
        origin = [p.detach().clone() for p in params]
        scale = [(w.abs() + eta) if adaptive else None for w in origin]
        for batch in batches:
            with torch.no_grad():
                for p, w in zip(params, origin):
                    p.copy_(w)
            with torch.no_grad():
                base = float(_batch_loss(model, loss_fn, batch))
            z = [torch.zeros_like(w) for w in origin]
            worst = 0.0
            for _ in range(steps):
                loss = _batch_loss(model, loss_fn, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(grads, origin)]
                    if adaptive:
                        g = [gi if t is None else gi * t for gi, t in zip(g, scale)]  # (t is not None when adaptive)
                    norm = float(_norm(g))
                    if not norm > 1e-30 or not math.isfinite(norm):
                        g = [torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) for w in origin]
                        norm = float(_norm(g))
                    z = [zi + (rho / norm) * gi for zi, gi in zip(z, g)]
                    zn = float(_norm(z))
                    if zn > rho:
                        z = [zi * (rho / zn) for zi in z]
                    for p, w, zi, t in zip(params, origin, z, scale):
                        p.copy_(w + (zi if t is None else zi * t))  # t is None unless adaptive
                    worst = max(worst, float(_batch_loss(model, loss_fn, batch)) - base)
            values.append(worst)
    return sum(values) / len(values)


# -- the Hessian ----------------------------------------------------------------------------------------


class _HessianOperator:
    """``v ↦ H v`` for the Hessian of the mean over the batches of the batch losses, by double
    backward (Pearlmutter 1994). The gradient graphs of all batches are built once and reused
    (``retain_graph``): meant for a measurement subset that fits in memory."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[Batch]) -> None:
        self.params = [p for _, p in _named_params(model)]
        self.grads = []
        for batch in batches:
            loss = _batch_loss(model, loss_fn, batch) / len(batches)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self.grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])

    def random(self, generator: torch.Generator | None, rademacher: bool = False) -> list[Tensor]:
        out = []
        for p in self.params:
            if rademacher:
                v = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1)
            else:
                v = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            out.append(v.to(p.device))
        return out

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        total = [torch.zeros_like(p) for p in self.params]
        for grads in self.grads:
            pairs = [(g, vi) for g, vi in zip(grads, v) if g.requires_grad]
            if not pairs:
                continue
            hv = torch.autograd.grad(
                [g for g, _ in pairs], self.params, grad_outputs=[vi for _, vi in pairs],
                retain_graph=True, allow_unused=True,
            )
            total = [t if h is None else t + h.detach() for t, h in zip(total, hv)]
        return total


def _power_iteration(
    op: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int, tol: float
) -> float:
    """Power iteration of the symmetric operator ``op`` from ``v``: the Rayleigh quotient
    ``vᵀ op(v)`` of ``v ← op(v)/‖op(v)‖``, after ``iters`` products or once two successive values
    agree to ``tol`` (relative)."""
    norm: Tensor | float = _norm(v)
    v = [x / norm for x in v]
    eigenvalue = None
    for _ in range(iters):
        hv = op(v)
        new = float(_dot(v, hv))
        norm = float(_norm(hv))
        if norm == 0.0 or not math.isfinite(norm):
            return new
        v = [x / norm for x in hv]
        if eigenvalue is not None and abs(new - eigenvalue) <= tol * abs(new):
            return new
        eigenvalue = new
    return float(eigenvalue)  # type: ignore[arg-type]


def hessian_max_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """The largest eigenvalue ``λ_max`` of the Hessian ``H`` of the training loss (mean over
    ``batches``) with respect to the trainable parameters, by power iteration on Hessian-vector
    products:

        v₀ ~ N(0, I) (from ``generator``), v ← Hv/‖Hv‖,  λ = vᵀHv,

    stopping after ``iters`` products or when ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``. Each product is a
    double backward (Pearlmutter 1994), so ``H`` is never formed; cost per iteration about two
    backward passes per batch (PyHessian, Yao et al. 2020). Power iteration converges to the
    eigenvalue of largest *magnitude*, at the rate ``|λ₂/λ₁|`` per iteration. Near a minimum
    that is ``λ_max``; when it comes out negative (a saddle region, early in training, where a
    negative eigenvalue dominates), it is the most negative one ``λ_min``, and a second power
    iteration on the shifted operator ``H − λ_min·I`` (positive semi-definite, same
    eigenvectors) gives ``λ_max − λ_min``, hence ``λ_max``: at most ``2·iters`` products then.

    Weights, buffers and mode are restored exactly afterwards; ``.grad`` is not touched.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    batches = _batch_list(batches)
    with _preserved(model):
        hvp = _HessianOperator(model, loss_fn, batches)
        eigenvalue = _power_iteration(hvp, hvp.random(generator), iters, tol)
        if eigenvalue < 0:
            shift = eigenvalue

            def shifted(v: list[Tensor]) -> list[Tensor]:
                return [h - shift * x for h, x in zip(hvp(v), v)]

            eigenvalue = _power_iteration(shifted, hvp.random(generator), iters, tol) + shift
    return float(eigenvalue)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> float:
    """Hutchinson's estimate of the trace of the Hessian of the training loss (mean over
    ``batches``): the mean over ``samples`` Rademacher vectors ``v`` (entries ±1 with probability
    ½, from ``generator``) of ``vᵀHv``, since ``E[vᵀHv] = tr(H)`` when ``E[vvᵀ] = I``.

    The estimate is unbiased; its variance per sample is ``2(‖H‖_F² − Σᵢ Hᵢᵢ²)`` (Rademacher
    vectors give the smallest variance among such estimators, Hutchinson 1989), so the standard
    error falls as ``1/√samples``. A diagonal ``H`` is estimated exactly by a single sample.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    batches = _batch_list(batches)
    with _preserved(model):
        hvp = _HessianOperator(model, loss_fn, batches)
        total = 0.0
        for _ in range(samples):
            v = hvp.random(generator, rademacher=True)
            total += float(_dot(v, hvp(v)))
    return total / samples


# -- loss landscapes ----------------------------------------------------------------------------------


def filter_normalized_direction(
    model: nn.Module, generator: torch.Generator | None = None, ignore_bias_bn: bool = True
) -> dict[str, Tensor]:
    """A random direction in weight space, filter-normalised (Li et al., NeurIPS 2018, §4):
    Gaussian entries, then every filter ``d[i]`` (the slice along dimension 0: an output row of a
    linear layer's weight, an output channel of a convolution's) rescaled to the norm of the
    same filter of the weights, ``d[i] ← d[i]·‖w[i]‖/‖d[i]‖``. Parameters with at most one
    dimension (biases, BatchNorm/LayerNorm weights) get a zero direction with
    ``ignore_bias_bn=True`` (the paper's choice), otherwise the same rescaling as one filter.

    Returns a dict keyed by parameter name, each tensor shaped like its parameter.
    """
    out = {}
    for name, p in _named_params(model):
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            if ignore_bias_bn:
                d = torch.zeros_like(w)
            else:
                d = d * (w.norm() / d.norm().clamp_min(1e-30))
        else:
            flat_d, flat_w = d.reshape(w.shape[0], -1), w.reshape(w.shape[0], -1)
            factor = flat_w.norm(dim=1, keepdim=True) / flat_d.norm(dim=1, keepdim=True).clamp_min(1e-30)
            d = (flat_d * factor).reshape(w.shape)
        out[name] = d
    return out


def _evaluate_points(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    coefficients: Tensor,
    directions: list[dict[str, Tensor]],
    chunk: int,
    vmap: bool,
) -> Tensor:
    """Mean batch loss at ``w + Σ_k c_k d_k`` for every row ``c`` of ``coefficients``
    (shape ``(points, len(directions))``), without writing into the model: the weights go in
    through ``torch.func.functional_call``, ``chunk`` points at a time, with copies of the
    buffers. ``vmap=True`` vectorises each chunk with ``torch.func.vmap`` (falling back to the
    loop when the model does not allow it); on CPU the plain loop was faster for the demo's MLP
    and CNN (batched matmuls and grouped convolutions on one thread), hence the default."""
    from torch.func import functional_call

    named = _named_params(model)
    origin = {n: p.detach() for n, p in named}
    losses = torch.empty(coefficients.shape[0], dtype=torch.float64)

    def point_loss(weights: dict[str, Tensor]) -> Tensor:
        total: Tensor | float = 0.0
        for inputs, targets in batches:
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            total = total + loss_fn(functional_call(model, {**weights, **buffers}, args), targets)
        assert isinstance(total, Tensor)  # a loss tensor: _batch_list refuses an empty list
        return total / len(batches)

    use_vmap = vmap
    with torch.no_grad():
        for start in range(0, coefficients.shape[0], chunk):
            c = coefficients[start : start + chunk]
            stacked = {
                n: w.unsqueeze(0)
                + sum(c[:, k].to(w).view(-1, *([1] * w.dim())) * d[n].unsqueeze(0) for k, d in enumerate(directions))
                for n, w in origin.items()
            }
            values = None
            if use_vmap:
                try:
                    values = torch.func.vmap(point_loss)(stacked)
                except Exception:  # data-dependent control flow, in-place buffer updates ...
                    use_vmap = False
            if values is None:
                values = torch.stack([point_loss({n: s[i] for n, s in stacked.items()}) for i in range(c.shape[0])])
            losses[start : start + c.shape[0]] = values.detach().to(torch.float64).cpu()
    return losses


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    steps: int = 41,
    span: float = 1.0,
    generator: torch.Generator | None = None,
    ignore_bias_bn: bool = True,
    direction: dict[str, Tensor] | None = None,
    chunk: int = 16,
    vmap: bool = False,
) -> dict[str, Any]:
    """The loss along a line through the weights, ``f(α) = L(w + α·d)`` for ``steps`` values of
    ``α`` evenly spaced in ``[−span, span]``, with ``d`` a filter-normalised random direction
    (:func:`filter_normalized_direction`, Li et al., NeurIPS 2018) drawn from ``generator`` unless
    ``direction`` is given. Two models measured with generators of the same seed get directions
    drawn from the same random numbers, each normalised to its own filters: their curves are
    comparable (that is the point of filter normalisation).

    Returns ``{"alphas": (steps,), "losses": (steps,) float64, "direction": d}``. The model is not
    modified (the weights are passed functionally; buffers are copied).
    """
    batches = _batch_list(batches)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if direction is None:
        direction = filter_normalized_direction(model, generator, ignore_bias_bn)
    alphas = torch.linspace(-span, span, steps, dtype=torch.float64)
    with _preserved(model):
        losses = _evaluate_points(model, loss_fn, batches, alphas[:, None], [direction], chunk, vmap)
    return {"alphas": alphas, "losses": losses, "direction": direction}


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    steps: int = 21,
    span: float = 1.0,
    generator: torch.Generator | None = None,
    ignore_bias_bn: bool = True,
    directions: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    chunk: int = 16,
    vmap: bool = False,
) -> dict[str, Any]:
    """The loss on a plane through the weights, ``f(α, β) = L(w + α·d₁ + β·d₂)`` on a
    ``steps × steps`` grid over ``[−span, span]²``, with two filter-normalised random directions
    (Li et al., NeurIPS 2018; in high dimension two random directions are nearly orthogonal)
    drawn in turn from ``generator`` unless ``directions`` is given.

    Returns ``{"alphas": (steps,), "betas": (steps,), "losses": (steps, steps) float64 indexed
    [i, j] = f(alphas[i], betas[j]), "directions": (d₁, d₂)}``. The model is not modified.
    """
    batches = _batch_list(batches)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if directions is None:
        first = filter_normalized_direction(model, generator, ignore_bias_bn)
        directions = (first, filter_normalized_direction(model, generator, ignore_bias_bn))
    axis = torch.linspace(-span, span, steps, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis) if steps > 1 else torch.zeros(1, 2, dtype=torch.float64) + axis
    with _preserved(model):
        losses = _evaluate_points(model, loss_fn, batches, grid, list(directions), chunk, vmap)
    return {"alphas": axis, "betas": axis.clone(), "losses": losses.reshape(steps, steps), "directions": directions}
