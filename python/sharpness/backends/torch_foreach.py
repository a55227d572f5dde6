"""Any-device engine: ``torch._foreach_*`` ops over the parameters' own tensors.

It serves devices without a native kernel (CUDA until the Triton engine lands, MPS, ...),
``backend="torch"``, and parameters that cannot be re-homed into flat buffers (frozen ones, whose
gradients stay ``None`` until they are unfrozen). Parameters keep their own storage; a per-parameter
backup gives exact restoration; the base optimizer always takes its own step.

Complex parameters are served here (the flat engines take real floating dtypes only), as their
real pairs: every operation sees ``torch.view_as_real`` of the weights, gradients, backups and
state vectors (a trailing dimension of 2), as torch.optim's optimizers do. So ``‖g‖² = Σ|g|²``,
inner products are the real ones, ``Re⟨x, y⟩``, and elementwise rules (ASAM's ``|w|+η``, Adam-like
moments, masks, noise) act on real and imaginary parts as separate coordinates: a complex model
follows the same trajectory as the same model written with real pairs. State vectors keep the
parameter's own dtype and shape (complex), as torch.optim's do.

Gradient norms are accumulated in float64 (float32 where the device has no float64: MPS) whatever
the parameters' dtype, so float16 gradients whose norm exceeds float16's range (65504) still get
their finite norm. ASAM's ``(|w|+η)·g`` and the perturbation of 16-bit weights are computed in
float32 and rounded once to the weights' dtype, as the native kernels do.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor

from sharpness.backends._common import draw_uniform, filter_noise, host_copy, norm_weight_sq, scale_of, write_tensors
from sharpness.buffers import SPARSE_GRADIENTS, is_sparse

_HALF = (torch.float16, torch.bfloat16)

# What torch's foreach ops take, and return (a tuple from the out-of-place ones).
Tensors: TypeAlias = "list[Tensor] | tuple[Tensor, ...]"


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real pairs (``torch.view_as_real``: a trailing dimension of 2, a
    view sharing the storage); any other tensor as itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype norms and sums of squares are accumulated in: float64, or float32 on MPS
    (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class TorchEngine:
    """Serves parameters of one (device, dtype) with foreach ops over lists."""

    name = "torch"
    shards_parameters = False  # whole tensors (the DTensor subclass holds shards)

    def __init__(self, params: list[Tensor], group_of: list[int], stats: Counter) -> None:
        self.params = params
        self.group_of = group_of
        self.stats = stats
        self.backups: dict[int, Tensor] = {}
        self.by_group: dict[int, list[int]] = {}
        self.perturbed: list[int] = []
        # "exact": restore from per-parameter backups; "subtract": keep e rounded to bfloat16 and
        # subtract it (set by the optimizer).
        self.memory = "exact"
        self.offsets: dict[int, Tensor] = {}
        self._by_offsets = False

    def release(self) -> None:
        pass

    def begin(self) -> None:
        self.by_group = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if is_sparse(p.grad):  # COO or compressed: one refusal, the flat engines' too
                raise RuntimeError(SPARSE_GRADIENTS)
            self.by_group.setdefault(self.group_of[i], []).append(i)

    def zero_grad(self, set_to_none: bool) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _view(self, t: Tensor) -> Tensor:
        """The tensor the vector operations act on: ``t`` as real pairs when complex."""
        return real_view(t)

    def _grad(self, i: int) -> Tensor:
        """Parameter ``i``'s gradient, as the vector operations see it; ``i`` must hold one (as
        every parameter :meth:`begin` files in ``by_group`` does)."""
        grad = self.params[i].grad
        assert grad is not None, f"parameter {i} holds no gradient"
        return self._view(grad)

    def _lists(self, indices: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        return [self._view(self.params[i]) for i in indices], [self._grad(i) for i in indices]

    @staticmethod
    def _adaptive_factor(weights: list[Tensor], eta: float) -> Tensors:
        """``T = |w| + η`` per tensor; in float32 for 16-bit weights (``T²g`` overflows float16
        long before ``e`` does)."""
        if weights and weights[0].dtype in _HALF:  # an engine's tensors share one dtype
            t: Tensors = [w.float() for w in weights]
            torch._foreach_abs_(t)
        else:
            t = torch._foreach_abs(weights)
        torch._foreach_add_(t, eta)
        return t

    def _squared_norms(self, group: dict[str, Any], weights: list[Tensor], grads: list[Tensor]) -> Tensors:
        """Per tensor, ``‖g‖²`` (adaptive groups: ``‖(|w|+η)g‖²``) as a 0-d tensor in the
        accumulation dtype (foreach norms; torch's CUDA kernels accumulate them in float32, and
        ``(|w|+η)g`` is formed in float32 for 16-bit tensors: see :meth:`_in_float64`)."""
        terms: Tensors = grads
        if group["sam_adaptive"]:
            terms = torch._foreach_mul(self._adaptive_factor(weights, float(group["sam_eta"])), grads)
        norms = torch._foreach_norm(terms, dtype=accumulation_dtype(grads[0].device))
        return torch._foreach_mul(norms, norms)  # one call, not one square per tensor

    @staticmethod
    def _in_float64(group: dict[str, Any], weights: list[Tensor], grads: list[Tensor], squares: Tensors) -> Tensors:
        """``squares`` with each non-finite entry recomputed from float64 copies (one tensor at a
        time): a non-finite norm then means a non-finite gradient, never an overflow of a float32
        accumulator or product. Without float64 (MPS) they stay as they are."""
        if accumulation_dtype(grads[0].device) != torch.float64 or bool(torch.isfinite(torch.stack(squares)).all()):
            return squares
        eta = float(group["sam_eta"])
        out = list(squares)
        for k, (w, g) in enumerate(zip(weights, grads)):
            if not bool(torch.isfinite(out[k])):
                x = (w.double().abs() + eta) * g.double() if group["sam_adaptive"] else g.double()
                out[k] = torch.linalg.vector_norm(x).square()
        return out

    def sum_of_squares(self, groups: list[dict[str, Any]]) -> float:
        total = 0.0
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                group = groups[gi]
                if group["sam_rho"] == 0:
                    continue  # outside the perturbation: neither in the norm nor perturbed
                weights, grads = self._lists(indices)
                squares = self._squared_norms(group, weights, grads)
                part = float(torch.stack(squares).sum())
                if not math.isfinite(part):  # rare: overflowing gradients; the host read is made anyway
                    part = float(torch.stack(self._in_float64(group, weights, grads, squares)).sum())
                c2 = norm_weight_sq(group)
                total += part if c2 == 1.0 else part * c2
        return total

    def perturb(self, groups: list[dict[str, Any]], norm: float) -> None:
        self.perturbed = []
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                group = groups[gi]
                if group["sam_rho"] == 0:
                    continue
                weights, grads = self._lists(indices)
                subtract = self.memory == "subtract"
                if not subtract:
                    backups = [self._view(self._backup(i)) for i in indices]
                    torch._foreach_copy_(backups, weights)
                e = self._perturbation(group, weights, grads, norm)
                if subtract:
                    offsets = [self._offset(i) for i in indices]
                    torch._foreach_copy_(offsets, e)  # e rounded to bfloat16: what w moves by
                    e = offsets
                torch._foreach_add_(weights, e)  # w + e in e's dtype, rounded once to w's
                self.perturbed.extend(indices)
        self._by_offsets = self.memory == "subtract"

    def _perturbation(self, group: dict[str, Any], weights: list[Tensor], grads: list[Tensor], norm: float) -> Tensors:
        """``e = s·g`` (adaptive: ``s·T²g``), ``s = ±ρ/(norm+ε)``; in float32 for 16-bit weights,
        as the native kernels compute it, so that ``w + e`` is rounded once."""
        scale = scale_of(group, norm)
        if group["sam_adaptive"]:
            t = self._adaptive_factor(weights, float(group["sam_eta"]))
            torch._foreach_mul_(t, t)
            e: Tensors = torch._foreach_mul(t, grads)
            torch._foreach_mul_(e, scale)
            return e
        if grads and grads[0].dtype in _HALF:
            e = [g.float() for g in grads]
            torch._foreach_mul_(e, scale)
            return e
        return torch._foreach_mul(grads, scale)

    def _backup(self, i: int) -> Tensor:
        b = self.backups.get(i)
        p = self.params[i]
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = torch.empty_like(p, memory_format=torch.preserve_format)
            self.backups[i] = b
        return b

    @contextmanager
    def absent_grads_as_none(self) -> Iterator[None]:
        """Parameters here keep torch's own ``grad is None``: nothing to hide."""
        yield

    def _offset(self, i: int) -> Tensor:
        """The bfloat16 ``e`` of parameter ``i`` (of its real view's shape)."""
        o, p = self.offsets.get(i), self._view(self.params[i])
        if o is None or o.shape != p.shape or o.device != p.device:
            o = self.offsets[i] = torch.empty_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        return o

    def restore(self) -> None:
        if self.perturbed:
            weights = [self._view(self.params[i]) for i in self.perturbed]
            with torch.no_grad():
                if self._by_offsets:
                    torch._foreach_sub_(weights, [self.offsets[i] for i in self.perturbed])
                else:
                    torch._foreach_copy_(weights, [self._view(self.backups[i]) for i in self.perturbed])
            self.perturbed = []
            self._by_offsets = False

    def restore_bytes(self) -> int:
        """What restoration keeps: per-parameter backups and the subtract mode's bfloat16 ``e``."""
        return sum(t.numel() * t.element_size() for t in (*self.backups.values(), *self.offsets.values()))

    def serves_device_norm(self) -> bool:
        """Whether this engine's step can run on a norm kept on the device: only when it holds no
        gradient (nothing to perturb; it reads the norm on the host otherwise)."""
        return not self.by_group

    def multiply_grads(self, factor: Tensor) -> None:
        """``g ← factor·g`` for every gradient present; ``factor`` a 0-d float32 tensor."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self._local_factor(factor, grads[0].device))

    def _local_factor(self, factor: Tensor, device: torch.device) -> Any:
        return factor.to(device)

    def perturbed_tensors(self, groups: list[dict[str, Any]]) -> Iterator[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]:
        """(weights, backup, gradient, group) per perturbed parameter, complex ones as their real
        pairs (as every engine operation sees them), for diagnostics."""
        for i in self.perturbed:
            p, grad = self.params[i], self.params[i].grad
            assert grad is not None  # perturb() moves only the parameters that hold a gradient
            weights, backup, grad = (real_view(t) for t in (p.detach(), self.backups[i], grad))
            yield weights, backup, grad, groups[self.group_of[i]]

    def can_fuse(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
        return False

    # -- vectors over the parameters that hold a gradient ------------------------------------------

    def _active(self) -> list[int]:
        return [i for indices in self.by_group.values() for i in indices]

    def _state_tensor(self, i: int, name: str, state: dict, fill: float | None = None) -> Tensor:
        """``state[p_i][name]`` (the parameter's dtype and shape), created at zero (or with every
        real coordinate at ``fill``) where missing; returned as the vector operations see it."""
        entry = state[self.params[i]]
        if name not in entry:
            t = torch.zeros_like(self.params[i], memory_format=torch.preserve_format)
            if fill is not None:
                real_view(t).fill_(fill)  # a complex entry: fill + fill·i, both coordinates
            entry[name] = t
        return self._view(entry[name])

    def vector(self, name: str, state: dict) -> list[Tensor]:
        """Every active parameter's ``state[p][name]`` (created at zero), as real views."""
        return [self._state_tensor(i, name, state) for i in self._active()]

    def _array(self, name: str, state: dict) -> list[Tensor]:
        if name == "grads":
            return [self._grad(i) for i in self._active()]
        return self.vector(name, state)

    def dot(self, a: str, b: str, state: dict) -> float:
        xs, ys = self._array(a, state), self._array(b, state)
        return sum(float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())) for x, y in zip(xs, ys))

    def _dots_by_group(self, a: str, b: str, state: dict) -> dict[int, list[Tensor]]:
        """Per group, the fp64 0-d tensors ``a_i·b_i`` of its parameters that hold a gradient."""
        xs, ys = self._array(a, state), self._array(b, state)  # in the order of _active()
        out: dict[int, list[Tensor]] = {}
        k = 0
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                pairs = zip(xs[k : k + len(indices)], ys[k : k + len(indices)])
                out[gi] = [torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in pairs]
                k += len(indices)
        return out

    def group_dots(self, a: str, b: str, state: dict) -> dict[int, float]:
        """``Σ a·b`` per group over its parameters that hold a gradient (one host read per group)."""
        return {gi: float(torch.stack(dots).sum()) for gi, dots in self._dots_by_group(a, b, state).items()}

    def state_sums_of_squares(self, name: str, state: dict) -> dict[int, float] | None:
        """Per group over every trainable parameter, gradient or not (None when one lacks ``name``:
        a base optimizer's buffer is never created here); :meth:`group_dots` over them (the DTensor
        subclass's reduces across ranks)."""
        trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        if any(state.get(self.params[i], {}).get(name) is None for i in trainable):
            return None
        with_gradients, self.by_group = self.by_group, {}
        for i in trainable:
            self.by_group.setdefault(self.group_of[i], []).append(i)
        try:
            return self.group_dots(name, name, state)
        finally:
            self.by_group = with_gradients

    def scale_adaptive(self, x: str, groups: list[dict[str, Any]], state: dict) -> None:
        """``x ← T²⊙x``, ``T = |w|+η`` (in the weights' dtype), on the adaptive groups with
        ``ρ ≠ 0``, over the parameters that hold a gradient."""
        xs = dict(zip(self._active(), self._array(x, state)))
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                group = groups[gi]
                if group["sam_adaptive"] and group["sam_rho"] != 0:
                    t = torch._foreach_abs([self._view(self.params[i]) for i in indices])
                    torch._foreach_add_(t, float(group["sam_eta"]))
                    vectors = [xs[i] for i in indices]
                    torch._foreach_mul_(vectors, t)
                    torch._foreach_mul_(vectors, t)

    def mean_over_ranks(self, values: list[float]) -> list[float] | None:
        """Parameters held whole by this process (the DTensor engine averages): nothing to do."""
        return None

    def axpby(self, x: str, y: str, alpha: float, beta: float, state: dict) -> None:
        if x == y:
            raise ValueError("axpby needs two different vectors")
        with torch.no_grad():
            xs, ys = self._array(x, state), self._array(y, state)
            if ys:
                torch._foreach_mul_(ys, beta)
                torch._foreach_add_(ys, xs, alpha=alpha)

    def copy(self, src: str, dst: str, state: dict) -> None:
        with torch.no_grad():
            dsts, srcs = self._array(dst, state), self._array(src, state)
            if dsts:
                torch._foreach_copy_(dsts, srcs)

    def group_tensors(
        self, names: list[Any], state: dict, init: dict[str, float] | None = None, every: bool = False
    ) -> dict[int, list[list[Tensor]]]:
        """Per group index: for each of ``names``, the tensors of the group's parameters that hold
        a gradient (``every``: all trainable ones), as aligned per-parameter lists for
        ``torch._foreach_*`` ops (the same contract as the Rust engine's). A name is
        ``"weights"``, ``"grads"``, ``"backup"``, a state name (created at zero, or at
        ``init[name]``), or a flat tensor over all this engine's parameters in order (a complex
        parameter taking ``2·numel`` of it, its real pairs). Every tensor is a real view."""
        if every:
            by_group: dict[int, list[int]] = {}
            for i, p in enumerate(self.params):
                if p.requires_grad:
                    by_group.setdefault(self.group_of[i], []).append(i)
        else:
            by_group = self.by_group
        offsets = [0]
        if any(isinstance(n, Tensor) for n in names):
            for p in self.params:
                offsets.append(offsets[-1] + real_view(p).numel())
        out: dict[int, list[list[Tensor]]] = {}
        for gi, indices in by_group.items():
            lists: list[list[Tensor]] = []
            for name in names:
                if isinstance(name, Tensor):
                    lists.append([name[offsets[i] : offsets[i + 1]].view_as(real_view(self.params[i])) for i in indices])
                elif name == "weights":
                    lists.append([self._view(self.params[i]) for i in indices])
                elif name == "grads":
                    lists.append([self._grad(i) for i in indices])
                elif name == "backup":
                    lists.append([self._view(self._backup(i)) for i in indices])
                else:
                    fill = (init or {}).get(name)
                    lists.append([self._state_tensor(i, name, state, fill) for i in indices])
            out[gi] = lists
        return out

    def restore_and_step(self, base: torch.optim.Optimizer, groups: list[dict[str, Any]], synced: bool = False) -> None:
        raise RuntimeError("the torch engine has no fused step: restore, then let the base optimizer step")

    # -- moving the weights along a state vector (SAMPa's two points) ------------------------------

    def save_weights(self) -> None:
        """``backup ← weights`` for every trainable parameter, gradient or not, marking them as
        moved: :meth:`restore` then brings them back bit for bit."""
        indices = [i for i, p in enumerate(self.params) if p.requires_grad]
        with torch.no_grad():
            if indices:
                torch._foreach_copy_(
                    [self._view(self._backup(i)) for i in indices], [self._view(self.params[i]) for i in indices]
                )
        self.perturbed = indices

    def weights_from_backup(self, direction: str, scales: dict[int, float], state: dict) -> None:
        """``weights ← backup + scales[g]·direction`` for each group ``g`` (``direction`` is a
        state name, created at zero where missing); a group without a scale, or with 0, gets the
        backup exactly. Foreach ops per group. Needs :meth:`save_weights` first."""
        by_group: dict[int, list[int]] = {}
        for i in self.perturbed:
            by_group.setdefault(self.group_of[i], []).append(i)
        with torch.no_grad():
            for gi, indices in by_group.items():
                weights = [self._view(self.params[i]) for i in indices]
                torch._foreach_copy_(weights, [self._view(self.backups[i]) for i in indices])
                scale = float(scales.get(gi, 0.0))
                if scale != 0.0:
                    vectors = [self._state_tensor(i, direction, state) for i in indices]
                    torch._foreach_add_(weights, vectors, alpha=scale)

    # -- more vector ops (GSAM, Friendly SAM, WSAM, RSAM, SSAM) ------------------------------------

    def mul(self, x: str, y: str, state: dict) -> None:
        """``y ← x ⊙ y`` elementwise over the parameters that hold a gradient."""
        with torch.no_grad():
            xs, ys = self._array(x, state), self._array(y, state)
            if ys:
                torch._foreach_mul_(ys, xs)

    def add_square(self, x: str, y: str, state: dict) -> None:
        """``y ← y + x ⊙ x`` elementwise (e.g. Fisher scores from gradients)."""
        with torch.no_grad():
            xs, ys = self._array(x, state), self._array(y, state)
            if ys:
                torch._foreach_addcmul_(ys, xs, xs)

    def add_to_weights(self, direction: str, scales: dict[int, float], state: dict) -> None:
        """``w ← w + scales[g]·direction`` for each group ``g``, over the parameters that hold a
        gradient (``direction``: ``"grads"`` or a state name, created at zero where missing)."""
        active = self._active()
        vectors = dict(zip(active, self._array(direction, state)))
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                scale = float(scales.get(gi, 0.0))
                if scale != 0.0:
                    torch._foreach_add_([self._view(self.params[i]) for i in indices], [vectors[i] for i in indices], alpha=scale)

    def add_noise(self, scales: dict[int, float], generator: torch.Generator) -> None:
        """``w ← w + scales[g]·z`` per group ``g``, ``z ~ N(0, I)`` drawn from ``generator`` (on
        the CPU) as one vector over every trainable parameter of this engine, in order (a complex
        parameter takes ``2·numel`` numbers, its real pairs): the same numbers the flat engine
        draws for the same parameters."""
        indices = [i for i, p in enumerate(self.params) if p.requires_grad]
        if not indices:
            return
        first = real_view(self.params[indices[0]])
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        z = torch.randn(sum(real_view(self.params[i]).numel() for i in indices), generator=generator, dtype=dtype)
        z = z.to(first.device)
        offset = 0
        with torch.no_grad():
            for i in indices:
                p = self._view(self.params[i])
                n = p.numel()
                scale = float(scales.get(self.group_of[i], 0.0))
                if scale != 0.0:
                    p.add_(z[offset : offset + n].view_as(p), alpha=scale)
                offset += n

    def _tensor(self, name: str, i: int, state: dict) -> Tensor:
        """Parameter ``i``'s ``"grads"``, ``"weights"``, ``"backup"`` or state vector (created at
        zero), as the vector operations see it."""
        if name == "grads":
            return self._grad(i)
        if name == "weights":
            return self._view(self.params[i])
        if name == "backup":
            return self._view(self._backup(i))
        return self._state_tensor(i, name, state)

    def elementwise(
        self,
        fn: Callable[..., None],
        names: list[str],
        state: dict,
        every: bool = False,
        init: dict[str, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """The contract's :meth:`elementwise`: ``fn(torch, group, *tensors)`` once per covered
        parameter (those holding a gradient; ``every``: every trainable one), on its tensors as real
        views (local shards on the DTensor subclass). ``"noise"``: one ``torch.randn`` (float64 for
        float64 parameters, else float32) over the covered parameters' real entries in order, drawn
        on the CPU from ``generator`` (the flat engine's numbers for the same parameters); refused
        on shards."""
        if every:
            covered = [i for i, p in enumerate(self.params) if p.requires_grad]
        else:
            covered = self._active()
        noise: list[Tensor] = []
        if "noise" in names:
            if generator is None:  # never the global generator
                raise ValueError('elementwise(): "noise" needs the front\'s generator')
            if self.shards_parameters:
                raise ValueError(
                    "noise over whole parameters is not split over DTensor (FSDP2) shards: this method does "
                    "not support DTensor parameters"
                )
            views = [real_view(self.params[i]) for i in covered]
            dtype = torch.float64 if views and views[0].dtype == torch.float64 else torch.float32
            z = torch.randn(sum(v.numel() for v in views), generator=generator, dtype=dtype)
            z = z.to(views[0].device) if views else z
            noise = [part.view_as(v) for part, v in zip(z.split([v.numel() for v in views]), views)]
        fills = init or {}
        with torch.no_grad():
            for k, i in enumerate(covered):
                tensors = []
                for name in names:
                    if name == "noise":
                        tensors.append(noise[k])
                    elif name in ("grads", "weights", "backup"):
                        tensors.append(self._tensor(name, i, state))
                    else:
                        tensors.append(self._state_tensor(i, name, state, fills.get(name)))
                fn(torch, self.group_of[i], *tensors)

    def axpby_by_group(self, x: str, y: str, alphas: dict[int, float], beta: float, state: dict) -> None:
        """``y ← alphas[g]·x + beta·y`` over the parameters of each group ``g`` in ``alphas`` that
        hold a gradient (foreach ops per group)."""
        if x == y:
            raise ValueError("axpby needs two different vectors")
        with torch.no_grad():
            for gi, indices in self.by_group.items():
                if gi not in alphas:
                    continue
                ys = [self._tensor(y, i, state) for i in indices]
                torch._foreach_mul_(ys, float(beta))
                torch._foreach_add_(ys, [self._tensor(x, i, state) for i in indices], alpha=float(alphas[gi]))

    def add_filter_noise(self, into: str, scales: dict[int, float], generator: torch.Generator, state: dict) -> None:
        """Filter-wise relative noise (the contract's :meth:`add_filter_noise`) over the trainable
        parameters of the noised groups, as real views (a complex parameter is its real pairs, a
        trailing dimension of 2, as in every operation here): ``z`` one ``torch.randn`` on the
        CPU, float64 for float64 weights, else float32, the same numbers the flat engine draws
        for the same parameters; ``δ`` is added from that precision and kept in ``into``."""
        noised = [
            i
            for i, p in enumerate(self.params)
            if p.requires_grad and float(scales.get(self.group_of[i], 0.0)) != 0.0 and p.numel() > 0
        ]
        chosen = set(noised)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                entry = state.get(p, {})
                if i not in chosen and into in entry:
                    self._view(entry[into]).zero_()  # no noise here this step
            if not noised:
                return
            weights = [self._view(self.params[i]) for i in noised]
            deltas = filter_noise(weights, [float(scales[self.group_of[i]]) for i in noised], generator)
            for i, w, delta in zip(noised, weights, deltas):
                self._state_tensor(i, into, state).copy_(delta)
                w.add_(delta)

    # -- host copies and draws (SSAM's masks, ranked on the host) ----------------------------------

    def _whole(self, name: str, state: dict) -> list[Tensor]:
        """Per parameter, ``name`` as real pairs: the weights, the gradient (zeros where absent) or
        a state vector (created at zero). Whole tensors: refused on shards."""
        if self.shards_parameters:
            raise ValueError(
                "this method reads whole parameters (a mask ranked over every weight), which are split "
                "over DTensor (FSDP2) shards: it does not support DTensor parameters"
            )
        if name == "weights":
            return [self._view(p.detach()) for p in self.params]
        if name == "grads":
            return [self._view(p.grad) if p.grad is not None else torch.zeros_like(self._view(p.detach())) for p in self.params]
        return [self._state_tensor(i, name, state) for i in range(len(self.params))]

    def read(self, name: str, state: dict) -> list[Any]:
        return [host_copy(t) for t in self._whole(name, state)]

    def write(self, name: str, values: list[Any], state: dict) -> None:
        if name in ("grads", "weights", "backup"):
            raise ValueError(f"write() sets a state vector, not {name!r}")
        write_tensors(self._whole(name, state), values)

    def draw_uniform(self, count: int, generator: torch.Generator) -> Any:
        return draw_uniform(count, generator)

    def drop_gradients(self, keep: list[bool]) -> None:
        """``p.grad = None`` for each dropped parameter (the DTensor subclass: its local shards)."""
        for i, k in enumerate(keep):
            if not k:
                self.params[i].grad = None
        self.by_group = {gi: kept for gi, indices in self.by_group.items() if (kept := [i for i in indices if keep[i]])}

    def scale(self, x: str, factor: float, state: dict) -> None:
        """``x ← factor·x`` over the parameters that hold a gradient, one foreach op."""
        with torch.no_grad():
            xs = self._array(x, state)
            if xs:
                torch._foreach_mul_(xs, factor)
