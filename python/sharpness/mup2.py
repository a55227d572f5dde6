"""μP²: layerwise perturbation scaling for SAM under μP (Haas, Xu, Cevher, Chennuru Vankadara,
"μP²: Effective Sharpness Aware Minimization Requires Layerwise Perturbation Scaling", NeurIPS
2024, arXiv:2411.00075).

In the maximal update parameterization (μP) plain SAM's perturbation concentrates on the last
layer as the width grows: the hidden layers' share of it vanishes and the benefit of SAM goes
with it. μP² scales the radius per layer, and each layer's share of the gradient norm, so that
every layer stays effectively perturbed at every width:

    ε_l = ρ·num_l · g_l / sqrt( Σ_k den_k² ‖g_k‖² )       (one global norm)

with factors set by the layer's role and ``m = width / base_width`` (see
:func:`mup2_param_groups`). SAM implements it with per-group ``sam_rho = ρ·num_l`` and
``sam_norm_weight = den_l``.

Where the rule comes from: the paper's body (its equations, Definition 4, Algorithm 1) was not
available to us. The factors are taken from the first author's code (``moritzhaas/
large-lr-width-scaling``, ``utils/param.py``'s ``get_bcd`` with ``perturb="mpp"`` and the
``width_indep_gradnorms`` option of its trainer, which that repository inherited from μP²) and from
the paper's figure, table and Algorithm 1 captions as quoted in public summaries; the base-width
ratio ``m`` (so that ``m = 1`` is plain SAM) follows the ``mup`` package's convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Any

from torch import nn

ROLES = ("input", "hidden", "output", "width_independent")
_OPTIMIZERS = ("sgd", "adam", "adamw")
_VARIANTS = ("decoupled", "mpp")
_OWN_KEYS = ("params", "sam_rho", "sam_norm_weight", "lr", "mup2_role", "mup2_width_mult")
# Modules whose weight stores (fan_in, fan_out, ...) instead of torch.nn.Linear's (fan_out, fan_in).
_TRANSPOSED = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvTransposeNd)


def mup2_factors(role: str, m: float, optimizer: str = "sgd", variant: str = "decoupled") -> tuple[float, float, float]:
    """``(num, den, lr_mult)`` of one tensor: its radius is ``ρ·num``, its gradient enters the
    norm times ``den`` and its learning rate is ``η·lr_mult``.

    Example:
        >>> from sharpness.mup2 import mup2_factors
        >>> mup2_factors("output", 4.0, "sgd", "decoupled")
        (0.25, 0.5, 0.25)
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if not (m > 0.0 and math.isfinite(m)):
        raise ValueError(f"the width ratio must be a finite number > 0, got {m}")
    sgd = optimizer == "sgd"
    root = math.sqrt(m)
    if role == "input":
        return m, root, (m if sgd else 1.0)
    if role == "hidden":
        return 1.0, (1.0 if variant == "decoupled" else 1.0 / root), (1.0 if sgd else 1.0 / m)
    if role == "output":
        return 1.0 / m, (1.0 / root if variant == "decoupled" else 1.0 / (m * root)), 1.0 / m
    return 1.0, 1.0, 1.0


def _fan_dims(module: nn.Module, ndim: int) -> tuple[int, set[int]]:
    """(fan_out dim, fan_in dims) of a weight of ``module`` with ``ndim`` ≥ 2 dimensions."""
    if isinstance(module, _TRANSPOSED):
        return 1, {0} | set(range(2, ndim))
    return 0, set(range(1, ndim))


def _width_ratio(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> tuple[set[int], float]:
    """The dims whose size differs from the base (the width dims) and their common ratio."""
    if len(shape) != len(base_shape):
        raise ValueError(f"{name}: shape {tuple(shape)} and base shape {tuple(base_shape)} differ in the number of dims")
    dims = {d for d, (a, b) in enumerate(zip(shape, base_shape)) if a != b}
    if any(base_shape[d] == 0 or shape[d] == 0 for d in dims):
        raise ValueError(f"{name}: a width dim of size 0 (shape {tuple(shape)}, base {tuple(base_shape)})")
    ratios = {Fraction(shape[d], base_shape[d]) for d in dims}
    if len(ratios) > 1:
        raise ValueError(
            f"{name}: its width dims scale by different ratios ({', '.join(str(r) for r in sorted(ratios))}; "
            f"shape {tuple(shape)}, base {tuple(base_shape)}): μP² needs one width multiplier per tensor"
        )
    return dims, float(ratios.pop()) if ratios else 1.0


def mup2_param_groups(
    model: nn.Module,
    base_model: nn.Module,
    *,
    rho: float,
    lr: float,
    optimizer: str = "sgd",
    variant: str = "decoupled",
    roles: Mapping[str, str] | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    r"""Parameter groups for :class:`sharpness.SAM` with μP²'s layerwise perturbation scaling.

    μP² (Haas, Xu, Cevher, Chennuru Vankadara, NeurIPS 2024, arXiv:2411.00075) perturbs

    ::

        ε_l = ρ·num_l · g_l / sqrt( Σ_k den_k² ‖g_k‖² )     (one global norm over all tensors)

    and steps with the μP learning rates. Each tensor's role comes from comparing its shape with
    the same parameter of ``base_model`` (the same architecture at the width where ``ρ`` and
    ``η`` were tuned; build it on ``device="meta"`` to allocate nothing), as the ``mup`` package
    does: the dims whose size differs are width dims, ``m`` is their ratio
    ``width/base_width``. Fan-out is dim 0 and fan-in dims 1.. (conv kernels:
    ``in_channels·k·k``), except for ``nn.Embedding``/``EmbeddingBag`` and transposed
    convolutions, whose dims 0 and 1 are swapped.

    ======================  =====================  =======  ==============  ================  ========  ========
    role                    which tensors          num      den decoupled   den ``"mpp"``     SGD lr    Adam lr
    ======================  =====================  =======  ==============  ================  ========  ========
    ``input``               only fan-out scales;   m        m^½             m^½               η·m       η
                            biases, norm gains
    ``hidden``              fan-in and fan-out     1        1               m^-½              η         η/m
    ``output``              only fan-in scales     1/m      m^-½            m^-3/2            η/m       η/m
    ``width_independent``   no width dim           1        1               1                 η         η
    ======================  =====================  =======  ==============  ================  ========  ========

    One-dimensional parameters (biases, normalisation gains) are ``input``-like when their size
    scales with width, otherwise width independent. ``variant="decoupled"`` (the default, the
    paper's ResNet/ViT form) makes every layer's contribution to the norm width independent;
    ``"mpp"`` is the plain exponent form (the norm is then dominated by the input-like layers).
    The numerators and learning rates are the same in both. At ``m = 1`` (``base_model`` of the
    same width) every factor is 1: plain SAM.

    Provenance and caveats: the paper's equations were not available to us; the table is taken
    from the first author's code (``moritzhaas/large-lr-width-scaling``, whose ``get_bcd`` with
    ``perturb="mpp"`` and ``width_indep_gradnorms`` carry μP²'s rule over; its bias handling is
    unreliable, so the width-independent factors of 1, e.g. for the output bias, are our choice)
    and from the paper's captions. That code implements SAM with SGD only; the Adam column keeps
    the SGD perturbation factors with Adam-μP learning rates (our inference). The helper sets the
    radii, norm weights and learning rates only: μP's **initialisation** (hidden and input
    weights with variance ∝ 1/fan_in, the output layer ∝ 1/width or zero) is the user's job, e.g.
    with the ``mup`` package or by hand. Weight decay and other ``group_kwargs`` are passed
    through unscaled. Tied weights appear once, with the role of their first name.

    Args:
        model: the model to train.
        base_model: the same architecture at the base width (the same parameter names).
        rho: the base radius ``ρ`` (tuned at the base width).
        lr: the base learning rate ``η``.
        optimizer: the base optimizer family: ``"sgd"``, or ``"adam"``/``"adamw"``.
        variant: ``"decoupled"`` or ``"mpp"`` (denominator factors, see the table).
        roles: ``{pattern: role}`` overrides for parameters the shape rule gets wrong (the first
            matching shell-style pattern on the parameter name wins; ``m`` still comes from the
            shapes).
        **group_kwargs: added to every group (``momentum``, ``weight_decay``, ...).

    Returns:
        Groups ``{"params", "sam_rho", "sam_norm_weight", "lr", "mup2_role",
        "mup2_width_mult", **group_kwargs}``, one per distinct (role, ``m``), in the order their
        first parameter appears. A ``rho`` given to :class:`sharpness.SAM` does not apply to them.

    Example:
        >>> import torch, sharpness
        >>> def mlp(width, device=None):
        ...     return torch.nn.Sequential(
        ...         torch.nn.Linear(10, width, device=device), torch.nn.ReLU(),
        ...         torch.nn.Linear(width, width, device=device), torch.nn.ReLU(),
        ...         torch.nn.Linear(width, 3, device=device))
        >>> model, base = mlp(256), mlp(64, device="meta")  # m = 4; μP init is up to you
        >>> groups = sharpness.mup2_param_groups(model, base, rho=0.05, lr=0.1)
        >>> for g in groups:
        ...     print(g["mup2_role"], len(g["params"]), g["sam_rho"], g["sam_norm_weight"], g["lr"])
        input 3 0.2 2.0 0.4
        hidden 1 0.05 1.0 0.1
        output 1 0.0125 0.5 0.025
        width_independent 1 0.05 1.0 0.1
        >>> opt = sharpness.SAM(groups, torch.optim.SGD, momentum=0.9)
    """
    if not (rho >= 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    optimizer = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    clash = sorted(set(group_kwargs) & set(_OWN_KEYS))
    if clash:
        raise TypeError(f"mup2_param_groups sets {clash} itself; pass rho= and lr=, not group keys")
    for pattern, role in (roles or {}).items():
        if role not in ROLES:
            raise ValueError(f"roles[{pattern!r}] must be one of {ROLES}, got {role!r}")

    mine = dict(model.named_parameters())
    base = dict(base_model.named_parameters())
    if set(mine) != set(base):
        only_mine, only_base = sorted(set(mine) - set(base)), sorted(set(base) - set(mine))
        raise ValueError(
            "model and base_model must have the same parameter names (the same architecture at "
            f"another width); only in model: {only_mine[:5]}, only in base_model: {only_base[:5]}"
        )
    owner: dict[str, tuple[Any, str]] = {}
    for module_name, module in model.named_modules():
        for local, _p in module.named_parameters(recurse=False):
            owner.setdefault(f"{module_name}.{local}" if module_name else local, (module, local))

    groups: dict[tuple[str, float], dict[str, Any]] = {}
    for name, p in mine.items():
        dims, m = _width_ratio(name, tuple(p.shape), tuple(base[name].shape))
        module, local = owner.get(name, (None, name))
        if p.dim() >= 2:
            fan_out, fan_in = _fan_dims(module, p.dim()) if local == "weight" else (0, set(range(1, p.dim())))
            scales_out, scales_in = fan_out in dims, bool(fan_in & dims)
            role = {
                (True, True): "hidden",
                (True, False): "input",
                (False, True): "output",
                (False, False): "width_independent",
            }[(scales_out, scales_in)]
        else:
            role = "input" if dims else "width_independent"
        for pattern, forced in (roles or {}).items():
            if fnmatchcase(name, pattern):
                role = forced
                break
        num, den, lr_mult = mup2_factors(role, m, optimizer, variant)
        key = (role, m)
        if key not in groups:
            groups[key] = {
                "params": [],
                "sam_rho": rho * num,
                "sam_norm_weight": den,
                "lr": lr * lr_mult,
                "mup2_role": role,
                "mup2_width_mult": m,
                **group_kwargs,
            }
        groups[key]["params"].append(p)
    return list(groups.values())
