"""Run by torchrun in test_distributed.py: a few QAT steps on 2 processes, then check the replicas agree."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from lowbit.nn.qat import QATLinear
from lowbit.qat.trainer import TrainConfig, train


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial replicas
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(
        QATLinear.from_float(teacher[0], weight="lsq", act="int8_token"),
        nn.ReLU(),
        QATLinear.from_float(teacher[2], weight="ternary"),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 8, generator=g), torch.randint(0, 3, (128,), generator=g)
    train(student, teacher, x, y, TrainConfig(epochs=2, batch_size=32, lr=1e-2), progress=False)
    flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(out, "w") as f:
            changed = float((student[0].weight - teacher[0].weight).abs().max())
            json.dump(
                {
                    "world": dist.get_world_size(),
                    "changed": changed,
                    "max_diff": max(float((t - flat).abs().max()) for t in gathered),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
