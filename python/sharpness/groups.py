"""Parameter groups from a model: which parameters SAM perturbs, adapts, or decays.

Common recipes leave some parameters out of parts of a SAM step:

- ASAM (Kwon et al., ICML 2021). The official code (github.com/SamsungLabs/ASAM, ``asam.py``,
  ``ASAM.ascent_step``) rescales every parameter whose name contains ``"weight"`` by
  ``T_w = |w| + η``, BatchNorm and LayerNorm weights included, and leaves every other parameter
  (the biases) with ``T = 1``, still perturbed and in the norm. ``no_adaptivity=("bias",)``
  reproduces it for models whose parameters are all named ``weight`` or ``bias`` (every
  ``torch.nn`` layer); a parameter named neither (a ViT's ``cls_token``, ``pos_embed``) is not
  rescaled there either: add it by name, ``overrides={"*cls_token": {"sam_adaptive": False}}``.
  ``no_adaptivity=("bias", "norm")`` also leaves the normalisation weights unscaled: a common
  variant, not what the official code does.
- ViT/Mixer training with SAM (Chen et al., "When Vision Transformers Outperform ResNets without
  Pretraining or Strong Data Augmentations", ICLR 2022) keeps biases, normalisation parameters and
  embeddings out of the weight decay; some setups also keep them out of the perturbation.

:func:`param_groups` sorts a model's parameters into the categories ``"bias"``, ``"norm"``
(parameters of BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and ``"embedding"``
(``nn.Embedding``/``nn.EmbeddingBag`` weights), applies the requested exclusions, then any name
patterns, and returns groups ready for :class:`sharpness.SAM` (or any torch optimizer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

CATEGORIES = ("bias", "norm", "embedding")

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def categories_of(model: nn.Module) -> dict[str, set[str]]:
    """For every parameter name (as ``model.named_parameters()`` gives it), its categories."""
    found: dict[str, set[str]] = {}
    for module_name, module in model.named_modules():
        for local_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            cats = found.setdefault(name, set())
            if local_name == "bias":
                cats.add("bias")
            if isinstance(module, _NORM_TYPES):
                cats.add("norm")
            if isinstance(module, _EMBEDDING_TYPES) and local_name == "weight":
                cats.add("embedding")
    return found


def _check(categories: Iterable[str], what: str) -> set[str]:
    chosen = set(categories)
    unknown = chosen - set(CATEGORIES)
    if unknown:
        raise ValueError(f"{what}: unknown categories {sorted(unknown)}; known: {CATEGORIES}")
    return chosen


def param_groups(
    model: nn.Module,
    *,
    no_perturbation: Iterable[str] = (),
    no_adaptivity: Iterable[str] = (),
    no_weight_decay: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` with SAM settings per category and name pattern.

    Args:
        model: the model; parameters shared between modules appear once.
        no_perturbation: categories SAM leaves unperturbed (``sam_rho = 0``: outside the norm and
            the perturbation).
        no_adaptivity: categories ASAM does not rescale (``sam_adaptive = False``);
            ``("bias",)`` is the official ASAM code's choice (see the module docstring).
        no_weight_decay: categories with ``weight_decay = 0``.
        overrides: ``{pattern: settings}``; a parameter whose name matches the shell-style
            pattern (``fnmatch``, e.g. ``"head.*"``) gets these group settings on top of the
            category ones (the first matching pattern wins).

    Returns:
        A list of ``{"params": [...], **settings}`` dicts, one per distinct combination of
        settings, in the order their first parameter appears in the model.

    Example:
        >>> import torch, sharpness
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        >>> groups = sharpness.param_groups(model, no_adaptivity=("bias",), no_weight_decay=("bias", "norm"))
        >>> [len(g["params"]) for g in groups]  # weights; biases; the LayerNorm's weight (rescaled, not decayed)
        [2, 3, 1]
        >>> opt = sharpness.SAM(groups, torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1, weight_decay=5e-4)
    """
    rules = [
        (_check(no_perturbation, "no_perturbation"), "sam_rho", 0.0),
        (_check(no_adaptivity, "no_adaptivity"), "sam_adaptive", False),
        (_check(no_weight_decay, "no_weight_decay"), "weight_decay", 0.0),
    ]
    patterns = list((overrides or {}).items())
    cats = categories_of(model)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        settings: dict[str, Any] = {}
        for chosen, key, value in rules:
            if chosen & cats.get(name, set()):
                settings[key] = value
        for pattern, extra in patterns:
            if fnmatchcase(name, pattern):
                settings.update(extra)
                break
        key = repr(sorted(settings.items()))  # settings may hold unhashable values
        groups.setdefault(key, {**settings, "params": []})["params"].append(param)
    return list(groups.values())
