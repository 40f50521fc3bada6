"""What a compile is asked to do: CompileConfig, its validation before any work, and what
follows from the config alone (the float model it builds, the units the allocator sees, the
pinned edge layers, the output folder and whether it may be replaced). The steps that run
it are in fqhw.flow."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fqhw.backends.base import backend_names, get_backend
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.families import family
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.network import NetworkSpec, network_spec
from fqhw.stepcache import check_cache_writable, check_folder_writable


BIT_RANGE = (2, 8)


DEFAULT_CHANNELS = (16, 32, 64)  # the default CNN's


def default_cache_dir() -> Path:
    return Path(os.environ.get("FQHW_CACHE_DIR", Path.home() / ".cache" / "fqhw"))


@dataclass
class CompileConfig:
    target: str = "pynq-z2"
    budget: float = 4.0
    out_dir: Path = Path("fqhw-out")
    data: SyntheticDermConfig = field(default_factory=SyntheticDermConfig)
    # "builtin" (the synthetic set configured by `data`), "fitzpatrick17k:PATH",
    # "isic2019:PATH" or "csv:CSV[,IMAGE_DIR]" (fqhw.data.registry)
    data_spec: str = "builtin"
    # a fqhw.models.registry name: fqcnn (the default CNN), resnet18, resnet50,
    # deit_tiny_patch16_224, tiny_vit_5m_224
    model: str = "fqcnn"
    # the default CNN's block channels, or a ResNet's stage channels (timm's `channels`);
    # None: the model's own (fqcnn: DEFAULT_CHANNELS)
    channels: tuple[int, ...] | None = None
    model_kwargs: dict = field(default_factory=dict)  # more constructor arguments (e.g. depth=1)
    # > 1: every conv of the default CNN but the first whose output channels it divides is allocated in this
    # many output-channel groups, each its own width and folding, built as one layer per
    # group (fqhw.network.split_channel_groups, fqhw.quant.channel_groups)
    channel_groups: int = 1
    float_epochs: int = 12
    float_lr: float = 3e-3
    qat_epochs: int = 3
    qat_lr: float = 5e-4
    fairness_lambda: float = 0.5
    # (fairness weight, learning rate) pairs QAT tries, keeping the best on validation
    # (fqhw.quant.qat.tune; --tune gives qat.DEFAULT_GRID); empty: only the two above
    qat_grid: tuple[tuple[float, float], ...] = ()
    baq_epochs: int = 0  # > 0: learn the widths (BAQ) from the solver's allocation, then project (fqhw.quant.baq)
    baq_bitrate_lambda: float = 2.0
    edge_bits: int | None = 8  # weights of the first and last layer pinned here (None: free)
    min_fps: float | None = None
    verify_images: int = 32
    importance_samples: int = 256  # per group
    solver_time_limit_s: float = 30.0
    seed: int = 0
    cache_dir: Path = field(default_factory=default_cache_dir)
    checkpoint: Path | None = None  # float weights from this file (a state_dict) instead of training
    progress: bool = True  # progress bars and one line per step on stderr
    verbose: bool = False  # also each step's details (solver, FINN sub-steps)
    synth: bool = False  # also run FINN's remaining steps to a bitfile (needs Vivado)
    # "finn": per-channel float scales and BatchNorm, absorbed into FINN's thresholds;
    # "hls4ml": power-of-two scales, BatchNorm folded, quantized bias (fqhw.quant.po2)
    backend: str = "finn"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["cache_dir"] = str(self.cache_dir)
        d["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        return d


def validate(cfg: CompileConfig, markers: tuple[str, ...] = ("config.json",)) -> None:
    """Reject bad requests before any work is done (one line each, naming the fix).
    markers: the files that make an existing --out folder one this command may replace."""
    from fqhw.hwmodels import get_cost_model

    get_cost_model(cfg.target)  # raises FqhwError listing the known targets
    lo, hi = BIT_RANGE
    if not (lo <= cfg.budget <= hi) or not np.isfinite(cfg.budget):
        raise FqhwError(f"budget {cfg.budget:g} is outside [{lo}, {hi}]: pass --budget between {lo} and {hi} bits per weight")
    if cfg.edge_bits is not None and not (lo <= cfg.edge_bits <= hi):
        raise FqhwError(f"--edge-bits {cfg.edge_bits} is outside [{lo}, {hi}]")
    if cfg.backend not in backend_names():
        raise FqhwError(f"unknown backend {cfg.backend!r}: known backends are {', '.join(backend_names())}")
    fam = family(cfg.model)
    get_backend(cfg.backend).check(kind=fam.kind, model=cfg.model, target=cfg.target, synth=cfg.synth)
    fam.check(cfg.data.image_size)
    if cfg.channel_groups < 1:
        raise FqhwError(f"--channel-groups {cfg.channel_groups} must be at least 1")
    if cfg.channel_groups > 1 and cfg.model != "fqcnn":
        raise FqhwError(f"--channel-groups builds the default CNN only, not {cfg.model}: drop --channel-groups, or use --model fqcnn")
    if cfg.channels is not None and family(cfg.model).kind == "transformer":
        raise FqhwError(f"--channels sets the default CNN's or a ResNet's widths, not {cfg.model}'s: pass --model-arg (e.g. embed_dim=96)")
    if cfg.baq_epochs < 0:
        raise FqhwError(f"--baq-epochs {cfg.baq_epochs} is negative: pass 0 (off) or more")
    for lam, lr in cfg.qat_grid:
        if not (np.isfinite(lam) and lam >= 0 and np.isfinite(lr) and lr > 0):
            raise FqhwError(f"QAT grid entry (fairness lambda {lam:g}, lr {lr:g}) is invalid: lambda must be >= 0 and lr > 0")
    if cfg.verify_images < 1:
        raise FqhwError("--verify-images must be at least 1")
    check_writable(cfg.out_dir, markers)
    if cfg.cache_dir is not None:
        check_cache_writable(cfg.cache_dir)
    if cfg.synth:  # before hours of work, not after: the Xilinx tools must be here
        get_backend(cfg.backend).check_synth_tools(get_cost_model(cfg.target).limits.part)
    if cfg.checkpoint is not None:
        from fqhw.models.checkpoint import check_checkpoint_path

        check_checkpoint_path(cfg.checkpoint)
    # The budget against the pinned layers needs only the network's shape: check it before
    # any training, on the untrained model. (For a real data set the class count is known
    # only after loading; allocate() checks again.)
    from fqhw.allocator.cpsat import check_budget

    size = cfg.data.image_size
    untrained = build_model(cfg, cfg.data.num_classes)
    net = allocation_net(cfg, network_spec(untrained, (3, size, size), name=cfg.model))
    if is_fpga(cfg):  # a backend that may refuse the model is asked now, not after the training
        err = fam.build_refusal(cfg.backend, untrained, (3, size, size), net)
        if err is not None:
            raise err
    if cfg.data_spec == "builtin":
        check_budget(net, cfg.budget, cfg.target, bits=range(lo, hi + 1), pinned=pinned_edges(cfg, net))


def is_fpga(cfg: CompileConfig) -> bool:
    """The target is an FPGA board (FINN's cost model): the flow builds for it. An ASIC
    target is priced by its cost model only; the flow stops at the QONNX model."""
    from fqhw.hwmodels import get_cost_model
    from fqhw.hwmodels.finn import FinnCostModel

    return isinstance(get_cost_model(cfg.target), FinnCostModel)


def model_config(cfg: CompileConfig, num_classes: int) -> CNNConfig | dict:
    """What the float model is built from: the default CNN's CNNConfig (its cache key as
    before), else the registry name, size and constructor arguments."""
    if cfg.model == "fqcnn":
        try:
            return CNNConfig(in_channels=3, image_size=cfg.data.image_size, num_classes=num_classes,
                             channels=tuple(cfg.channels or DEFAULT_CHANNELS), **cfg.model_kwargs)
        except TypeError as e:
            raise FqhwError(f"fqcnn: {e}: see fqhw.models.cnn.CNNConfig for its arguments") from None
    if cfg.model == "cnv":
        from fqhw.models.registry import cnn_config

        if cfg.channels is not None:
            raise FqhwError("cnv: --channels does not apply (its channels are FINN's CNV's): use --model-arg width=W")
        return cnn_config("cnv", num_classes, cfg.data.image_size, **cfg.model_kwargs)
    kwargs = dict(cfg.model_kwargs, **({"channels": tuple(cfg.channels)} if cfg.channels is not None else {}))
    return {"model": cfg.model, "num_classes": num_classes, "image_size": cfg.data.image_size, "kwargs": kwargs}


def build_model(cfg: CompileConfig, num_classes: int) -> torch.nn.Module:
    from fqhw.models.registry import create

    mcfg = model_config(cfg, num_classes)
    if isinstance(mcfg, CNNConfig):
        return FairCNN(mcfg)
    return create(cfg.model, num_classes, cfg.data.image_size, **mcfg["kwargs"])


def pinned_edges(cfg: CompileConfig, net: NetworkSpec) -> dict[str, int] | None:
    """The first and last layer's weights at --edge-bits: every unit of them (channel groups)."""
    if cfg.edge_bits is None:
        return None
    edges = {net.layers[0].act_group, net.layers[-1].act_group}
    return {s.name: cfg.edge_bits for s in net.layers if s.act_group in edges}


def allocation_net(cfg: CompileConfig, net: NetworkSpec) -> NetworkSpec:
    """The units the allocator sees: the layers, or their channel groups (--channel-groups).
    The classifier head stays whole (its accumulator is one output), and so does the first
    conv: it reads the pixels, and FINN cannot move the input's layout transpose past the
    fork that would feed its groups (a Shuffle would be left inside the accelerator)."""
    if cfg.channel_groups <= 1:
        return net
    from fqhw.network import split_channel_groups

    return split_channel_groups(net, {s.name: cfg.channel_groups for s in net.layers[1:] if s.kind == "conv"})


def out_folder(out_dir) -> Path:
    """The folder --out names, absolute; a symlink's target (the link stays, the target is
    replaced: the staging folder is made beside it, on its file system)."""
    out_dir = Path(out_dir).absolute()
    return out_dir.resolve() if out_dir.is_symlink() else out_dir


def check_writable(out_dir: Path, markers: tuple[str, ...] = ("config.json",)) -> None:
    """The folder can be written and may be replaced: it is absent, empty, or an earlier
    output of the same command (it holds one of `markers`)."""
    out_dir = out_folder(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FqhwError(f"output folder {out_dir} exists and is not a folder: choose another --out")
    check_folder_writable(out_dir, out_dir.parent, "output folder", "--out")
    if out_dir.exists() and not os.access(out_dir, os.W_OK | os.X_OK):
        raise FqhwError(f"output folder {out_dir} cannot be written (no write permission): choose another --out")
    # A successful compile replaces the output folder whole: only ever replace an earlier
    # fqhw output (or an empty folder), never a folder of the user's own files.
    cwd = Path.cwd().absolute()
    if out_dir == cwd or out_dir in cwd.parents:
        raise FqhwError(f"output folder {out_dir} holds the current folder and would be replaced: choose a new folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / m).is_file() for m in markers):
        raise FqhwError(f"output folder {out_dir} is not empty and is not an fqhw output (it would be replaced): choose a new folder for --out")
