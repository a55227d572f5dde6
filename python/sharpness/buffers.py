"""Flat buffers: the parameters of one (device, dtype) re-homed as views of one contiguous tensor.

A SAM step is a handful of memory passes over every parameter; over hundreds of small tensors the
per-tensor overhead, not the arithmetic, dominates. :class:`FlatBuffers` gives each parameter's
``.data``, ``.grad`` and optimizer state a view into one flat tensor per kind, so each pass is a
single kernel call over contiguous memory.

The views stay valid only while nobody rebinds them. ``AccumulateGrad`` adds into an existing
``.grad`` in place, so gradients written by ``backward`` land in the flat buffer; but
``model.zero_grad()`` (``set_to_none=True``), ``p.data = ...``, loading a checkpoint or the base
optimizer creating its own state all replace a view by a fresh tensor. :meth:`FlatBuffers.sync`
detects each of those cheaply (identity and pointer checks) and copies the fresh tensor back into
the buffer, counting what it did so tests and benchmarks can tell the fast path from a repair.

Which parameters received a gradient since the last ``zero_grad`` is tracked with
post-accumulate-grad hooks: a view that is merely zero is not the same as torch's ``grad is None``
(an optimizer skips the latter entirely: no weight decay, no momentum).

Each slice keeps its parameter's memory layout: a dense, non-overlapping tensor of any strides
(channels_last, transposed) occupies exactly ``numel`` consecutive elements, so its weight,
gradient and state views are ``as_strided`` over the slice with the parameter's own strides, and
every elementwise pass over the flat buffer pairs the same elements. What cannot be re-homed
without breaking the user's model is decided by :func:`keep_in_place` and left to the in-place
torch engine.

Sparse gradients are refused (``SPARSE_GRADIENTS``), as on every engine: ``AccumulateGrad`` would
add a sparse gradient into the dense view, silently densifying it, so a tensor hook notes the
layout of each incoming gradient before that happens and :meth:`FlatBuffers.sync` raises.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from sharpness import _core


def as_numpy(t: Tensor) -> np.ndarray | None:
    """A numpy view of a contiguous CPU tensor; bfloat16 as its raw uint16 storage. None for a
    tensor on another device (device engines hand their kernels the tensors themselves)."""
    if t.device.type != "cpu":
        return None
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.detach().numpy()


def host_view(a: np.ndarray | None) -> np.ndarray:
    """``a``, a numpy view of a flat buffer (:func:`as_numpy`), where the caller knows the buffer
    is in host memory (the CPU engine's buffers always are): never None there."""
    assert a is not None, "a numpy view of a buffer that is not in host memory"
    return a


#: The error every engine raises for a sparse gradient.
SPARSE_GRADIENTS = (
    "SAM does not support sparse gradients (use a dense embedding: nn.Embedding(..., sparse=False))"
)
_SPARSE_LAYOUTS = frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})


def is_sparse(t: Tensor) -> bool:
    """Whether ``t`` has a sparse layout (COO or compressed)."""
    return t.layout in _SPARSE_LAYOUTS


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill exactly ``numel`` consecutive memory slots, in any order of
    its dimensions (dense and non-overlapping: contiguous, channels_last, transposed ...): sorted by
    stride, the dimensions of size > 1 must have strides 1, s0, s0·s1, ..."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _alone_in_storage(p: Tensor) -> bool:
    """``p`` is its storage's only user as far as ``p`` itself shows: not a view of a bigger tensor
    (its own base, an offset or a larger storage), not in shared memory (Hogwild's
    ``share_memory()``), dense."""
    if p.numel() == 0:
        return True
    if p.device.type == "cpu" and p.is_shared():
        return False
    storage = p.untyped_storage()
    return bool(
        p._base is None
        and p.storage_offset() == 0
        and storage.nbytes() == p.numel() * p.element_size()
        and is_dense(p)
    )


# Where each parameter re-homed by some FlatBuffers was put: (storage, element) data_ptr. A
# parameter still there sits in a flat buffer of this library (of this optimizer's previous layout,
# or of another SAM built on the same parameters), which it may leave freely.
_HOMES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def keep_in_place(params: list[Tensor]) -> list[bool]:
    """Which of ``params`` must keep their storage: re-homing rebinds ``p.data`` to a flat-buffer
    slice, which silently cuts ``p`` off from every other tensor on its old storage.

    A parameter stays where it is when it is a view of a bigger tensor, shares its storage with
    another of ``params`` (tied through ``.data``, also after the buffers were built), lives in
    shared memory, or is not dense (no flat slice can hold its layout). One in a flat buffer
    where a :class:`FlatBuffers` put it moves freely. A tensor without a storage of its own (a
    wrapper subclass) stays too. Runs once per layout."""
    storage_ptrs: list[int | None] = []  # None: no storage of its own
    for p in params:
        try:
            storage_ptrs.append(p.untyped_storage().data_ptr() if p.numel() else 0)
        except (RuntimeError, NotImplementedError):
            storage_ptrs.append(None)
    homed = [bool(ptr) and _HOMES.get(p) == (ptr, p.data_ptr()) for p, ptr in zip(params, storage_ptrs)]
    on_storage: dict[int, list[Tensor]] = {}
    for p, ptr, home in zip(params, storage_ptrs, homed):
        if ptr and not home:
            on_storage.setdefault(ptr, []).append(p)
    starts = Counter(p.data_ptr() for p, ptr in zip(params, storage_ptrs) if ptr)
    keep = []
    for p, ptr, home in zip(params, storage_ptrs, homed):
        if ptr is None:
            keep.append(True)
        elif not ptr:
            keep.append(False)  # no elements: nothing to share
        elif starts[p.data_ptr()] > 1:
            keep.append(True)  # tied: another parameter on the same elements
        elif home:
            keep.append(p.device.type == "cpu" and p.is_shared())
        elif (p.device.type == "cpu" and p.is_shared()) or not is_dense(p):
            keep.append(True)
        else:
            sharing = on_storage[ptr]
            keep.append((len(sharing) > 1 or not _alone_in_storage(p)) and not _held_only_by(sharing))
    return keep


def _held_only_by(params: list[Tensor]) -> bool:
    """Whether nothing but ``params`` holds their (common) storage: no base tensor, module buffer,
    ``state_dict()`` entry or other view is alive on it, so moving them cuts nobody off. A model
    saved whole with ``torch.save`` and loaded again has every parameter a view of one storage
    that nothing else holds: it moves into the flat buffers like any other. Read from the
    storage's reference count (torch's private ``_storage_Use_Count``; without it: False, the
    parameters stay)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    storage = params[0].untyped_storage()
    try:
        # one reference per parameter, one for the wrapper `storage` held here
        return int(use_count(storage._cdata)) == len(params) + 1
    except (AttributeError, RuntimeError, TypeError):
        return False


def _mark_received(buffers_ref: weakref.ref, index: int):
    def hook(_param: Tensor) -> None:
        buffers = buffers_ref()
        if buffers is not None:
            # What torch's p.grad would now be: the sparse gradient itself when there was none
            # (or a sparse one) before; added into a dense gradient, it is dense.
            if buffers.incoming_sparse[index]:
                if not buffers.received[index]:
                    buffers.sparse.add(index)
            elif buffers.sparse:
                buffers.sparse.discard(index)
            buffers.received[index] = True

    return hook


def _note_layout(buffers_ref: weakref.ref, index: int):
    # Runs before AccumulateGrad adds the gradient into the dense view (and for
    # torch.autograd.grad, which accumulates nothing: only _mark_received turns the note into a
    # refusal, so that call leaves no trace).
    def hook(grad: Tensor) -> None:
        buffers = buffers_ref()
        if buffers is not None:
            buffers.incoming_sparse[index] = grad.layout in _SPARSE_LAYOUTS

    # Pickling a tensor warns about its backward hooks unless they are marked: this one belongs to
    # the buffers, not to the tensor's data.
    return torch.utils.hooks.unserializable_hook(hook)


class FlatBuffers:
    """Weights, gradients and optimizer state of same-(device, dtype) parameters, each kind one
    contiguous tensor whose slices are the per-parameter tensors, each with its parameter's
    strides (the parameters must be dense: :func:`is_dense`).

    Args:
        params: the parameters, in the order of the optimizer's groups.
        group_of: for each parameter, the index of its parameter group.
        stats: a counter the optimizer reports; repairs are counted there.
    """

    def __init__(self, params: list[Tensor], group_of: list[int], stats: Counter) -> None:
        if not params:
            raise ValueError("FlatBuffers needs at least one parameter")
        self.params = params
        self.group_of = group_of
        self.stats = stats
        self.dtype = params[0].dtype
        self.device = params[0].device
        if not all(is_dense(p) for p in params):
            raise ValueError("FlatBuffers holds dense, non-overlapping tensors only (see keep_in_place)")
        # Shape and strides of each slice, fixed with the layout (a parameter whose strides change
        # is a layout change: _rehome_param).
        self.layouts = [(p.shape, None if p.is_contiguous() else p.stride()) for p in params]
        sizes = [p.numel() for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self.numel = self.offsets[-1]
        new = lambda: torch.zeros(self.numel, dtype=self.dtype, device=self.device)  # noqa: E731
        self.weights = new()
        self.grads = new()
        self.weight_views = [self._view(self.weights, i) for i in range(len(params))]
        self.grad_views = [self._view(self.grads, i) for i in range(len(params))]
        self.received = [False] * len(params)
        # Per parameter, whether the last gradient coming in was sparse (set before accumulation);
        # and the parameters whose gradient is sparse in torch's sense (torch's p.grad would be a
        # sparse tensor, the view holds it densified): sync refuses while there are any.
        self.incoming_sparse = [False] * len(params)
        self.sparse: set[int] = set()
        with torch.no_grad():
            for i, p in enumerate(params):
                self.weight_views[i].copy_(p)
                p.data = self.weight_views[i]
                if p.grad is not None:
                    if is_sparse(p.grad):
                        self.sparse.add(i)  # refused at the step, as the torch engine does
                    else:
                        self.grad_views[i].copy_(p.grad)
                    self.received[i] = True
                p.grad = self.grad_views[i]
        self.data_ptrs = [v.data_ptr() for v in self.weight_views]
        storage = self.weights.untyped_storage().data_ptr()
        for p, ptr in zip(params, self.data_ptrs):
            _HOMES[p] = (storage, ptr)
        ref = weakref.ref(self)
        self._hooks = [p.register_post_accumulate_grad_hook(_mark_received(ref, i)) for i, p in enumerate(params)]
        self._hooks += [p.register_hook(_note_layout(ref, i)) for i, p in enumerate(params)]
        self.state_buffers: dict[str, Tensor] = {}
        self.state_views: dict[str, list[Tensor]] = {}
        self.backup: Tensor | None = None
        self.np_weights = as_numpy(self.weights)
        self.np_grads = as_numpy(self.grads)
        self.np_backup: np.ndarray | None = None
        self.np_state: dict[str, np.ndarray | None] = {}

    def _view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter ``i``'s slice of ``flat``, in its shape and memory layout."""
        shape, stride = self.layouts[i]
        if stride is None:
            return flat[self.offsets[i] : self.offsets[i + 1]].view(shape)
        return flat.as_strided(shape, stride, flat.storage_offset() + self.offsets[i])

    def release(self) -> None:
        """Removes the hooks (the layout is being rebuilt)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def backups(self) -> np.ndarray | None:
        """The backup buffer for exact restoration, allocated on first use; as numpy (None for
        buffers not in host memory: :attr:`backup` is the tensor)."""
        if self.backup is None:  # (not np_backup: it stays None for device memory)
            self.backup = torch.empty_like(self.weights)
            self.np_backup = as_numpy(self.backup)
        return self.np_backup

    @property
    def backup_tensor(self) -> Tensor:
        """:attr:`backup`, where the caller knows :meth:`backups` has allocated it."""
        assert self.backup is not None, "backups() allocates the backup first"
        return self.backup

    # -- keeping the views attached -------------------------------------------------------------

    def sync(self) -> list[bool]:
        """Re-attaches any view that was replaced and returns, per parameter, whether it holds a
        gradient in torch's sense (``p.grad is not None``).

        A view that no backward wrote since ``zero_grad()`` but that holds non-zero values was
        written in place by other code; it counts as a gradient too, rather than being ignored.
        A gradient that is sparse in torch's sense raises ``RuntimeError`` (``SPARSE_GRADIENTS``),
        as the torch engine does: one set as ``p.grad``, or one a backward brought to a parameter
        without a gradient (torch would keep it sparse until a dense one is added or it is set
        to None); a sparse gradient added into a dense one is dense, in torch as here.
        """
        if self.sparse:
            # Checked first, before any repair can rebuild the layout and lose the record. A
            # gradient dropped (None) or replaced since is not the sparse one any more.
            self.sparse = {i for i in self.sparse if self.params[i].grad is self.grad_views[i]}
            if self.sparse:
                raise RuntimeError(SPARSE_GRADIENTS)
        received = self.received
        unknown = []  # views no backward wrote: zero, unless other code wrote them in place
        with torch.no_grad():
            for i, (p, grad_view, ptr) in enumerate(zip(self.params, self.grad_views, self.data_ptrs)):
                if p.data_ptr() != ptr:
                    self._rehome_param(i)
                grad = p.grad
                if grad is grad_view:
                    if not received[i]:
                        unknown.append(i)
                elif grad is None:
                    grad_view.zero_()
                    p.grad = grad_view
                    received[i] = False
                else:
                    if is_sparse(grad):
                        raise RuntimeError(SPARSE_GRADIENTS)
                    grad_view.copy_(grad)
                    p.grad = grad_view
                    received[i] = True
                    self.stats["regathered_grads"] += 1
        if unknown and self.np_grads is None:
            # Device buffers: one reduction and one host sync, only on steps where some parameter
            # received no gradient from a backward since zero_grad().
            flags = torch.stack([self.grad_views[i].ne(0).any() for i in unknown]).tolist()
            for i, nonzero in zip(unknown, flags):
                received[i] = bool(nonzero)
        elif unknown:
            g, offsets = host_view(self.np_grads), self.offsets  # host memory: np_grads is not None here
            written = _core.any_nonzero([g[offsets[i] : offsets[i + 1]] for i in unknown])
            for i, nonzero in zip(unknown, written):
                received[i] = nonzero
        return list(received)

    def _rehome_param(self, i: int) -> None:
        """``p.data`` was rebound: copy the new values into the buffer and rebind to the view. New
        data that must stay where it is (:func:`keep_in_place`: shared memory, a view of another
        tensor, or another parameter's slice here) or with other strides is a new layout."""
        p, view = self.params[i], self.weight_views[i]
        if p.dtype != self.dtype or p.device != self.device or p.numel() != view.numel():
            raise _LayoutChanged
        if p.numel() and (
            p.stride() != view.stride()
            or p.untyped_storage().data_ptr() == self.weights.untyped_storage().data_ptr()
            or not _alone_in_storage(p)
        ):
            raise _LayoutChanged
        view.copy_(p.data.reshape(view.shape))
        p.data = view
        self.stats["rehomed_params"] += 1

    def zero_grad(self, set_to_none: bool) -> None:
        """Zeroes every gradient in one pass; ``set_to_none`` marks them as absent (torch's None)."""
        with torch.no_grad():
            self.grads.zero_()
            if set_to_none:
                self.sparse.clear()  # (torch zeroes a sparse gradient in place: it stays sparse)
            for i, p in enumerate(self.params):
                if p.grad is not self.grad_views[i]:
                    if p.grad is None and not set_to_none:
                        continue  # torch leaves a None gradient None
                    if not set_to_none:
                        self.received[i] = True  # torch would keep it as a zero tensor
                    p.grad = self.grad_views[i]
            if set_to_none:
                self.received = [False] * len(self.params)

    # -- optimizer state as views -----------------------------------------------------------------

    def state_flat(self, name: str, dtype: torch.dtype | None = None, per_param: bool = False) -> np.ndarray | None:
        """A flat state buffer (zeros when created), as numpy (None for buffers not in host memory:
        :attr:`state_buffers` holds the tensor). ``per_param`` makes one scalar per parameter
        (Adam's ``step``) instead of one element per weight."""
        if name not in self.state_buffers:
            n = len(self.params) if per_param else self.numel
            flat = torch.zeros(n, dtype=dtype or self.dtype, device=self.device)
            self.state_buffers[name] = flat
            if per_param:
                self.state_views[name] = [flat[i] for i in range(len(self.params))]
            else:
                self.state_views[name] = [self._view(flat, i) for i in range(len(self.params))]
            self.np_state[name] = as_numpy(flat)
        return self.np_state[name]

    def adopt_state(self, state: dict[Any, dict], name: str, i: int) -> bool:
        """Makes ``state[param_i][name]`` our view, copying a foreign tensor in. Returns whether the
        entry existed (False: the view was created and left at zero, the entry not set)."""
        entry = state[self.params[i]]
        view = self.state_views[name][i]
        current = entry.get(name)
        if current is view:
            return True
        if current is None:
            return False
        with torch.no_grad():
            if isinstance(current, Tensor):
                view.copy_(current.reshape(view.shape))
            else:  # a Python number, as old checkpoints store Adam's step
                view.fill_(float(current))
        entry[name] = view
        self.stats["rehomed_state"] += 1
        return True


class _LayoutChanged(Exception):
    """A parameter changed dtype, device or size: the buffers must be rebuilt."""


LayoutChanged = _LayoutChanged
