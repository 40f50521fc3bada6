"""The data type every data set yields: images with a class label and a demographic group."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Images are uint8; the model sees pixel / 256, so the 8-bit unsigned input quantizer
# (scale 2^-8) reproduces the pixel codes exactly and every backend starts from the same
# integers.
INPUT_SCALE = 1.0 / 256.0


@dataclass
class GroupedImages:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N
    groups: np.ndarray  # int64, N: index into group_names
    group_names: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.groups) == n):
            raise ValueError("images, labels and groups must have the same length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.images.shape[1:])

    def subset(self, idx: np.ndarray) -> "GroupedImages":
        return GroupedImages(self.images[idx], self.labels[idx], self.groups[idx], self.group_names, self.class_names)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, g) with x already scaled to the model's input range."""
        x = torch.from_numpy(self.images.astype(np.float32) * INPUT_SCALE)
        return x, torch.from_numpy(self.labels.astype(np.int64)), torch.from_numpy(self.groups.astype(np.int64))

    def loader(self, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
        x, y, g = self.tensors()
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y, g), batch_size=batch_size, shuffle=shuffle, generator=gen
        )


@dataclass
class DataSplits:
    train: GroupedImages
    val: GroupedImages
    test: GroupedImages
    name: str = "builtin"
