"""The default model: a small FINN-friendly CNN.

Conv-BN-ReLU blocks with max pooling and a linear head: every op maps onto a FINN HW layer
(sliding window + MVAU with BN and ReLU folded into thresholds, streaming max pool), and the
last pooling reduces the map to 1x1 so the flatten before the head is layout-free.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 4
    channels: tuple[int, ...] = (16, 32, 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CNNConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


class FairCNN(nn.Module):
    """blocks: [Conv3x3(pad 1) - BN - ReLU - MaxPool] x len(channels); the last pool is global.

    Module names are stable (features.<i>.conv / .bn / .relu / .pool, head) because the quant
    model, the allocation and the reports all refer to layers by these names.
    """

    def __init__(self, cfg: CNNConfig = CNNConfig()):
        super().__init__()
        self.cfg = cfg
        blocks = []
        c_in, size = cfg.in_channels, cfg.image_size
        for i, c_out in enumerate(cfg.channels):
            last = i == len(cfg.channels) - 1
            pool = size if last else 2
            if not last and size % 2:
                raise ValueError(f"image size {cfg.image_size} must halve evenly through {len(cfg.channels)} blocks")
            blocks.append(
                nn.Sequential(
                    dict_to_ordered(
                        conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                        bn=nn.BatchNorm2d(c_out),
                        relu=nn.ReLU(),
                        pool=nn.MaxPool2d(pool),
                    )
                )
            )
            c_in, size = c_out, size // pool
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in, cfg.num_classes, bias=False)  # no float add after the last MVAU

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


def dict_to_ordered(**modules):
    from collections import OrderedDict

    return OrderedDict(modules)
