"""The methods' rules written once, without torch: what both fronts (:mod:`sharpness.optim` over
torch tensors, :mod:`sharpness.numpy` over numpy arrays) share. Nothing here imports torch, so the
numpy front works where torch is not installed."""

#: Added to every norm a method divides by (SAM's ``ρ g/(‖g‖ + ε)``, as the reference implementation
#: does): one value for every method, engine and front.
NORM_EPS = 1e-12


def every_method() -> dict[str, type]:
    """Every method defined here, by class name: the names in each module's ``__all__`` (the
    rule modules; ``base`` and ``contract`` export none). Both fronts build their classes from this,
    so a new method is one file here."""
    import importlib
    import pkgutil

    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            found[name] = getattr(module, name)
    return found
