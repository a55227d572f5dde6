"""The methods' rules written once, without torch: what both fronts (:mod:`sharpness.optim` over
torch tensors, :mod:`sharpness.numpy` over numpy arrays) share. Nothing here imports torch, so the
numpy front works where torch is not installed."""
