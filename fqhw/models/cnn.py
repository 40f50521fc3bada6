"""The FINN-friendly CNNs: the default model (fqcnn) and FINN's CNV topology (cnv).

Conv-BN-ReLU blocks with optional max pooling and a linear head: every op maps onto a FINN
HW layer (sliding window + MVAU with BN and ReLU folded into thresholds, streaming max
pool), and the map is 1x1 before the head so the flatten is layout-free.

fqcnn: 3x3 convs with padding 1, a 2x2 pool after every block, a global pool after the last.

cnv: the CNV network of FINN's BNN-PYNQ and brevitas_examples (Umuroglu et al., "FINN",
FPGA 2017): six unpadded 3x3 convs of 64-64-128-128-256-256 channels with a 2x2 max pool
after the second and the fourth (32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5 -> 3 -> 1 px), then
fully connected layers of 512 and 512 units, each with BatchNorm and a quantized ReLU, and
the classifier. On the 1x1 map left by the last conv a fully connected layer is a 1x1 conv,
so the two hidden FC layers are built as 1x1 conv blocks: the same matrix (MW = C_in,
MH = C_out, one pixel) that FINN's MVAU computes for a Linear layer, and the same code path
through quantization, export, FINN and the bit-exact check as every other block. `width`
scales every channel count (0.25 gives 16-16-32-32-64-64 and 128-128), so a 2-core CPU can
train it.
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
    # per block; None: 3 for every block (fqcnn)
    kernels: tuple[int, ...] | None = None
    padding: int = 1
    # max-pool window (= stride) after each block, 1 = none; None: 2 after every block but
    # the last, a global pool after the last (fqcnn)
    pools: tuple[int, ...] | None = None

    def block_kernels(self) -> tuple[int, ...]:
        return tuple(self.kernels) if self.kernels is not None else (3,) * len(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CNNConfig":
        d = dict(d)
        for k in ("channels", "kernels", "pools"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


CNV_CHANNELS = (64, 64, 128, 128, 256, 256, 512, 512)  # six convs, then the two hidden FC layers
CNV_KERNELS = (3, 3, 3, 3, 3, 3, 1, 1)
CNV_POOLS = (1, 2, 1, 2, 1, 1, 1, 1)
CNV_IMAGE_SIZE = 32  # the unpadded convs and two pools take 32 px to 1 x 1


def cnv_config(num_classes: int, image_size: int = CNV_IMAGE_SIZE, width: float = 1.0, in_channels: int = 3) -> CNNConfig:
    """FINN's CNV at `width` times its channel counts (each at least 1)."""
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if image_size != CNV_IMAGE_SIZE:
        raise ValueError(f"cnv takes {CNV_IMAGE_SIZE} px images (its unpadded convs end on a 1 x 1 map), got {image_size}: "
                         f"pass --data-image-size {CNV_IMAGE_SIZE}")
    channels = tuple(max(1, round(c * width)) for c in CNV_CHANNELS)
    return CNNConfig(in_channels=in_channels, image_size=image_size, num_classes=num_classes, channels=channels,
                     kernels=CNV_KERNELS, padding=0, pools=CNV_POOLS)


class FairCNN(nn.Module):
    """blocks: [Conv(k, pad) - BN - ReLU - MaxPool or Identity] x len(channels), then the head.

    Module names are stable (features.<i>.conv / .bn / .relu / .pool, head) because the quant
    model, the allocation and the reports all refer to layers by these names. A block
    without pooling has `pool = nn.Identity()` (copied as it is by the quantized models).
    """

    def __init__(self, cfg: CNNConfig = CNNConfig()):
        super().__init__()
        self.cfg = cfg
        kernels = cfg.block_kernels()
        if len(kernels) != len(cfg.channels) or (cfg.pools is not None and len(cfg.pools) != len(cfg.channels)):
            raise ValueError(f"kernels and pools need one entry per block ({len(cfg.channels)} channels given)")
        blocks = []
        c_in, size = cfg.in_channels, cfg.image_size
        for i, c_out in enumerate(cfg.channels):
            last = i == len(cfg.channels) - 1
            size = size + 2 * cfg.padding - kernels[i] + 1
            if size < 1:
                raise ValueError(f"image size {cfg.image_size} is too small for block {i} (kernel {kernels[i]})")
            if cfg.pools is None:
                pool = size if last else 2
            else:
                pool = cfg.pools[i]
            if pool > 1 and size % pool:
                raise ValueError(f"image size {cfg.image_size} must divide evenly by the pools through {len(cfg.channels)} blocks")
            blocks.append(
                nn.Sequential(
                    dict_to_ordered(
                        conv=nn.Conv2d(c_in, c_out, kernels[i], padding=cfg.padding, bias=False),
                        bn=nn.BatchNorm2d(c_out),
                        relu=nn.ReLU(),
                        pool=nn.MaxPool2d(pool) if pool > 1 else nn.Identity(),
                    )
                )
            )
            c_in, size = c_out, size // pool
        if size != 1:
            raise ValueError(f"the last block leaves a {size} x {size} map; the head needs 1 x 1 (add a global pool)")
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in, cfg.num_classes, bias=False)  # no float add after the last MVAU

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


def copy_pool(pool: nn.Module) -> nn.Module:
    """A fresh module with the same pooling as a FairCNN block's `pool` (MaxPool2d or Identity)."""
    if isinstance(pool, nn.Identity):
        return nn.Identity()
    return nn.MaxPool2d(pool.kernel_size, stride=pool.stride)


def dict_to_ordered(**modules):
    from collections import OrderedDict

    return OrderedDict(modules)
