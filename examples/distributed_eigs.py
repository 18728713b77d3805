"""The top Hessian eigenvalues of one model over data split across processes: each process holds
its own shard, every product is all-reduced, so every process sees the operator of all the data.

    torchrun --nproc_per_node=2 examples/distributed_eigs.py            # CPUs: gloo
    torchrun --nproc_per_node=<GPUs> examples/distributed_eigs.py       # GPUs: NCCL, one per process

Each rank prints the same eigenvalues; rank 0 also checks them against one process on all the data."""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import hessext
from hessext import linalg


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same model and data on every rank; each keeps its own shard
    model = (
        nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double().to(device)
    )
    x, y = torch.randn(1000, 10, dtype=torch.float64), torch.randn(1000, 1, dtype=torch.float64)
    bounds = [len(x) * r // world for r in range(world + 1)]
    shard = TensorDataset(x[bounds[rank] : bounds[rank + 1]].to(device), y[bounds[rank] : bounds[rank + 1]].to(device))
    H = hessext.HessianOperator(model, nn.MSELoss(), DataLoader(shard, batch_size=128), process_group=True)
    values, _ = linalg.eigsh(H, k=4, generator=torch.Generator().manual_seed(0))
    print(f"rank {rank}/{world}: top-4 eigenvalues {values.tolist()}")
    if rank == 0:
        alone = hessext.HessianOperator(model, nn.MSELoss(), (x.to(device), y.to(device)))
        check, _ = linalg.eigsh(alone, k=4, generator=torch.Generator().manual_seed(0))
        print(
            f"one process on all the data: {check.tolist()} (max difference {(values - check).abs().max().item():.1e})"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
