"""Engines that carry out SAM's memory passes, one per kind of tensor.

Every engine serves the parameters of one (device, dtype) and offers the same small contract,
so the optimizers in :mod:`sharpness.optim` never look at devices:

- ``begin()``: take stock of which parameters hold a gradient (torch's ``grad is not None``);
- ``sum_of_squares(groups)``: ``Σ g²`` (``Σ ((|w|+η)g)²`` for adaptive groups) as a float;
- ``perturb(groups, norm)``: save what exact restoration needs, then ``w ← w + e`` with
  ``e = ρ·g/(norm+ε)`` (``ρ·T²g/(norm+ε)`` for adaptive groups). Groups with ``ρ = 0`` are
  outside the perturbation: they count in neither the norm nor ``e``;
- ``restore()``: ``w ←`` the saved weights, bit for bit;
- ``can_fuse(base, groups)`` / ``restore_and_step(base, groups, synced)``: the restoration fused with
  the base optimizer's step, where the engine has a kernel for that optimizer;
- ``zero_grad(set_to_none)``.

:class:`~sharpness.backends.rust.RustEngine` serves CPU tensors through the native kernels over
flat buffers; :class:`~sharpness.backends.torch_foreach.TorchEngine` serves any device with
``torch._foreach_*`` ops over lists; :class:`~sharpness.backends.triton.TritonEngine` serves
CUDA tensors with Triton kernels over flat buffers, with the norm kept on the device (its
``sum_of_squares`` returns a 0-d device tensor and ``perturb`` accepts one: no host sync). Triton
itself is imported only when a Triton engine is built.

:class:`~sharpness.backends.numpy_engine.NumpyEngine` serves numpy arrays (the numpy front) with
the same kernels and no torch. The modules are imported on first use, so that the numpy engine
never imports torch.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "NORM_EPS": "sharpness.methods",
    "NumpyEngine": "sharpness.backends.numpy_engine",
    "RustEngine": "sharpness.backends.rust",
    "TorchEngine": "sharpness.backends.torch_foreach",
    "TritonEngine": "sharpness.backends.triton",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'sharpness.backends' has no attribute {name!r}")
