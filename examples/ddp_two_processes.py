"""SAM under DistributedDataParallel: two processes on the CPU (gloo), started by this script
(``torch.multiprocessing.spawn``; no torchrun needed), training an MLP on scikit-learn's digits.

    python examples/ddp_two_processes.py                 # ~20 s
    python examples/ddp_two_processes.py --per-replica   # each replica perturbs with its own gradient
    python examples/ddp_two_processes.py --quick         # seconds; checks the replicas agree

Each process takes half of every batch (``DistributedSampler``). Synchronised (the default),
both backward passes all-reduce the gradients, so every replica computes the same global norm and
the same perturbation: plain ``opt.step(closure)`` is SAM on the global batch.
``--per-replica`` runs ``sharpness.distributed.sam_step(..., per_replica=True)``: the first
backward inside ``no_sync()`` (m-sharpness across replicas), the second synchronised. Either way
the replicas end with identical weights: the script gathers them and exits with status 1 if
they differ by a single bit.

Needs ``pip install 'sharpness[torch]' scikit-learn``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sharpness
import sharpness.distributed

WORLD_SIZE = 2


def digits_datasets() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)

    def dataset(x, y):
        return torch.utils.data.TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    return dataset(x_train, y_train), dataset(x_test, y_test)


def worker(rank: int, args: argparse.Namespace, address: str) -> None:
    """One replica: joins the process group, trains, and checks its weights against the other's."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=WORLD_SIZE)
    try:
        train_set, test_set = digits_datasets()
        torch.manual_seed(0)  # the same initial weights (DDP would broadcast rank 0's anyway)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=0.9)
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=WORLD_SIZE, rank=rank, seed=0)
        # per process: half of the global batch
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size // WORLD_SIZE, sampler=sampler, drop_last=True)
        for epoch in range(1, args.epochs + 1):
            sampler.set_epoch(epoch)
            losses = []
            for x, y in loader:

                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()  # all-reduced by DDP (not the first one with --per-replica)
                    return loss

                if args.per_replica:
                    loss = sharpness.distributed.sam_step(model, opt, closure, per_replica=True)
                else:
                    loss = opt.step(closure)
                losses.append(loss.item())
            if rank == 0 and (epoch % args.log_every == 0 or epoch == args.epochs):
                with torch.no_grad():
                    x_test, y_test = test_set.tensors
                    accuracy = (model.module(x_test).argmax(1) == y_test).float().mean().item()
                print(f"epoch {epoch:3d}/{args.epochs}  loss (rank 0) {sum(losses) / len(losses):.4f}  "
                      f"test accuracy {accuracy:.3f}", flush=True)

        mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, mine)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            print(f"FAILED (rank {rank}): the replicas' weights differ", flush=True)
            raise SystemExit(1)
        if rank == 0:
            print(f"OK: the {WORLD_SIZE} replicas end with identical weights, bit for bit "
                  f"({opt.stats['steps']} SAM steps each)", flush=True)
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down mid-exchange
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: there gloo's and DDP's background threads can still be
    # destroyed while joinable and abort the process ("terminate called without an active
    # exception") after the work is done and checked. Only a successful replica gets here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs, then the check")
    parser.add_argument("--epochs", type=int, default=None, help="default 40; --quick: 2")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch (split over the processes)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--per-replica", action="store_true", help="perturb each replica with its own gradient")
    parser.add_argument("--log-every", type=int, default=None)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 40)
    args.log_every = args.log_every or (1 if args.quick else 5)

    start = time.perf_counter()
    # The processes meet through a file (no port to pick, so no race with other jobs for one).
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = "file://" + str(Path(folder) / "rendezvous")
        try:
            mp.spawn(worker, args=(args, rendezvous), nprocs=WORLD_SIZE, join=True)
        except mp.ProcessExitedException as error:  # a replica's check failed (or it crashed)
            print(f"FAILED: {error}")
            return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
