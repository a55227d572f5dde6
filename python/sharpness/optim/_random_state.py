"""torch's random state, captured and replayed: ``same_noise`` gives the second forward pass of a
SAM step the first one's dropout (and any other randomness in the model)."""

from __future__ import annotations

import torch
from torch import Tensor


class RandomState:
    """torch's random state on the CPU and on the CUDA devices in use, to replay a forward pass's
    noise (as torch.utils.checkpoint does)."""

    def __init__(self, cpu: Tensor, cuda: dict[int, Tensor]) -> None:
        self.cpu = cpu
        self.cuda = cuda

    @classmethod
    def capture(cls, devices: set[torch.device]) -> RandomState:
        cuda = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for d in devices:
                if d.type == "cuda":
                    index = torch.cuda.current_device() if d.index is None else d.index
                    cuda[index] = torch.cuda.get_rng_state(index)
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)

