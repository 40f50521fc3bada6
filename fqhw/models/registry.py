"""Model zoo by name: the default FairCNN and a few timm classifiers.

Every model is built from its definition alone (timm with `pretrained=False`): fqhw runs
without a network, so weights come only from a local file, read by
`fqhw.models.checkpoint.load_checkpoint` (weights-only: a pickle that would run code is
refused, a key or shape that does not fit is named). `create` never lets timm look for
weights of its own: it passes `pretrained=False` and no `checkpoint_path`, so that the one
loader with fqhw's checks is the only way weights enter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from fqhw.errors import FqhwError


@dataclass(frozen=True)
class ModelEntry:
    """How to build one named model.

    family: "cnn" (fqhw's FairCNN), "resnet" or "transformer" (what the quantizers and
    backends need to know); image_size_kwarg: the timm keyword that sets the input size
    ("" where the model takes any size, as convolutional timm models do);
    min_image_size: the smallest square input the float model is accepted for (timm's
    models run on smaller ones, down to 8 px, but every layer then sees a 1 x 1 map). The
    QONNX export of a ResNet needs 64 px (see fqhw.quant.generic.export_generic_qonnx).
    """

    name: str
    family: str
    description: str
    timm_name: str = ""
    image_size_kwarg: str = ""
    min_image_size: int = 1
    defaults: dict = field(default_factory=dict)


_ENTRIES: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("fqcnn", "cnn", "fqhw's FINN-friendly Conv-BN-ReLU-MaxPool CNN (the default)", min_image_size=2),
        # FINN's BNN-PYNQ CNV (fqhw.models.cnn.cnv_config); width=0.25 .. 1 scales its channels
        ModelEntry("cnv", "cnn", "FINN's CNV: six 3x3 convs 64-64-128-128-256-256, FC 512-512 (model arg width)",
                   min_image_size=32),
        ModelEntry("resnet18", "resnet", "timm ResNet-18 (BasicBlock x [2, 2, 2, 2])", "resnet18", min_image_size=32),
        ModelEntry("resnet50", "resnet", "timm ResNet-50 (Bottleneck x [3, 4, 6, 3])", "resnet50", min_image_size=32),
        # patch 16: the image side must be a multiple of 16
        ModelEntry(
            "deit_tiny_patch16_224", "transformer", "timm DeiT-Tiny, patch 16", "deit_tiny_patch16_224",
            image_size_kwarg="img_size", min_image_size=16,
        ),
        # TinyViT has no img_size argument: its window attention pads any input (seen to run
        # from 8 px; at 32 px its stages see 8, 4, 2, 1 px maps)
        ModelEntry("tiny_vit_5m_224", "transformer", "timm TinyViT-5M", "tiny_vit_5m_224", min_image_size=32),
    )
}


def known_models() -> list[str]:
    """The names `create` accepts, in a fixed order (the default first)."""
    return list(_ENTRIES)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; an unknown name is one FqhwError line listing the known."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise FqhwError(f"unknown model {name!r}: known models are {', '.join(known_models())}") from None


def _timm_factory(entry: ModelEntry) -> Callable[..., nn.Module]:
    import timm

    def build(num_classes: int, image_size: int, **kwargs) -> nn.Module:
        kw = {**entry.defaults, **kwargs}
        for banned in ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            if banned in kw:
                raise FqhwError(f"{entry.name}: {banned} is not accepted; weights come only from create(..., checkpoint=FILE)")
        if entry.image_size_kwarg:
            kw[entry.image_size_kwarg] = image_size
        return timm.create_model(entry.timm_name, pretrained=False, num_classes=num_classes, in_chans=3, **kw)

    return build


def cnn_config(name: str, num_classes: int, image_size: int, **kwargs):
    """The CNNConfig of a registry CNN (fqcnn: CNNConfig fields as kwargs; cnv: `width`);
    a bad argument is one FqhwError line naming the model."""
    from fqhw.models.cnn import CNNConfig, cnv_config

    cfg_kw = dict(kwargs)
    for k in ("channels", "kernels", "pools"):
        if k in cfg_kw and cfg_kw[k] is not None:
            cfg_kw[k] = tuple(int(c) for c in cfg_kw[k])
    try:
        if name == "cnv":
            unknown = sorted(set(cfg_kw) - {"width"})
            if unknown:
                raise ValueError(f"unknown argument(s) {', '.join(unknown)}: cnv takes --model-arg width=W only")
            return cnv_config(num_classes, image_size, **cfg_kw)
        return CNNConfig(in_channels=3, image_size=image_size, num_classes=num_classes, **cfg_kw)
    except (TypeError, ValueError) as e:
        raise FqhwError(f"{name}: {e}") from None


def create(name: str, num_classes: int, image_size: int, checkpoint=None, **kwargs) -> nn.Module:
    """The model `name` for `num_classes` classes and square RGB inputs of side `image_size`,
    in eval mode, with random weights or, given `checkpoint` (a local file saved with
    torch.save(model.state_dict(), ...)), its weights loaded weights-only and strictly.

    kwargs go to the model's constructor (FairCNN: CNNConfig fields such as channels; timm:
    e.g. channels=(8, 16, 32, 64) for a narrow ResNet, depth / embed_dim for DeiT), so tests
    can build small models of the same topology."""
    entry = model_entry(name)
    num_classes, image_size = int(num_classes), int(image_size)
    if num_classes < 2:
        raise FqhwError(f"{name}: num_classes must be at least 2, got {num_classes}")
    if image_size < entry.min_image_size:
        raise FqhwError(f"{name}: image size {image_size} is below the smallest it runs on ({entry.min_image_size})")
    if entry.name == "deit_tiny_patch16_224":
        patch = int(kwargs.get("patch_size", 16))
        if image_size % patch:
            raise FqhwError(f"{name}: image size {image_size} must be a multiple of the patch size {patch}")
    if entry.family == "cnn":
        from fqhw.models.cnn import FairCNN

        model = FairCNN(cnn_config(name, num_classes, image_size, **kwargs))
    else:
        try:
            model = _timm_factory(entry)(num_classes, image_size, **kwargs)
        except TypeError as e:
            raise FqhwError(f"{name}: {str(e).splitlines()[0]}") from None
    if checkpoint is not None:
        from fqhw.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model.eval()
