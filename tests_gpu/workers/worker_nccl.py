"""NCCL on this GPU under torchrun (tests_gpu/test_gpu.py): a process group with the nccl
backend, its collectives, and one DDP step whose gradients equal the unwrapped model's.

Prints one JSON line with what it checked; exits non-zero on any mismatch.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fr_distill.models import get_backbone


def main() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    x = torch.arange(6, dtype=torch.float32, device=device) + dist.get_rank()
    summed = x.clone()
    dist.all_reduce(summed)
    gathered = torch.empty(world * 6, device=device)
    dist.all_gather_into_tensor(gathered, x)
    scattered = torch.empty(6, device=device)  # chunk r of the sum of every rank's [x]*world
    dist.reduce_scatter_tensor(scattered, torch.cat([x] * world))
    expected_sum = sum(torch.arange(6.0) + r for r in range(world)).to(device)
    assert torch.equal(summed, expected_sum), (summed, expected_sum)
    assert torch.equal(scattered, expected_sum), (scattered, expected_sum)
    assert torch.equal(gathered, torch.cat([torch.arange(6.0, device=device) + r
                                            for r in range(world)]))

    torch.manual_seed(0)
    model = get_backbone("iresnet18", 64, width=0.25).to(device)
    reference = get_backbone("iresnet18", 64, width=0.25).to(device)
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, device_ids=[device])
    images = torch.randn(8, 3, 112, 112, device=device)
    ddp(images).square().mean().backward()
    reference(images).square().mean().backward()
    worst = max((a.grad - b.grad).abs().max().item() for a, b in
                zip(model.parameters(), reference.parameters()) if a.grad is not None)
    assert worst <= 1e-5 * world, worst  # one rank: DDP's average is the identity
    print(json.dumps({"backend": dist.get_backend(), "world_size": world,
                      "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                      "ddp_max_grad_diff": worst}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
