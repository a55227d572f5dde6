"""The methods' rules written once, without torch: what both fronts (:mod:`sharpness.optim` over
torch tensors, :mod:`sharpness.numpy` over numpy arrays) share. Nothing here imports torch, so the
numpy front works where torch is not installed."""

#: Added to every norm a method divides by (SAM's ``ρ g/(‖g‖ + ε)``, as the reference implementation
#: does): one value for every method, engine and front.
NORM_EPS = 1e-12
