"""NetworkSpec / LayerSpec: what a cost model and the allocator need to know of a model.

Read from the float model once (shapes by a forward pass with hooks), so the allocator and
the cost models never touch torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import networkx as nx
import torch
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """One compute layer (conv or linear) as a matrix-vector unit sees it.

    MW = K*K*C_in inputs per output, MH = C_out outputs, N = output pixels (1 for linear).
    """

    name: str  # module path in the float model, e.g. "features.0"
    kind: str  # "conv" or "linear"
    mw: int
    mh: int
    out_pixels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    in_channels: int = 0
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    has_output_act: bool = True  # False for the classifier head: its output is the accumulator
    # max pooling applied to this layer's (activated) output, as FINN builds it after the
    # MVAU (sliding window + Pool); pool_kernel 0 means no pooling follows the layer
    pool_kernel: int = 0
    pool_stride: int = 0
    pool_out_hw: tuple[int, int] = (0, 0)
    # channel group: the name of the layer this unit is an output-channel group of ("" for a
    # whole layer). The groups of a layer read the same input and share one output
    # activation width (see split_channel_groups).
    group: str = ""
    group_index: int = 0  # which of its layer's channel groups (0 for a whole layer)

    @property
    def act_group(self) -> str:
        """Name of the activation this unit writes: its layer's (shared by its groups)."""
        return self.group or self.name

    @property
    def params(self) -> int:
        return self.mw * self.mh

    @property
    def macs(self) -> int:
        return self.mw * self.mh * self.out_pixels


@dataclass
class NetworkSpec:
    """The compute layers in execution order, plus the data-flow graph between them."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    layers: list[LayerSpec]
    edges: list[tuple[str, str]] = field(default_factory=list)

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(s.macs for s in self.layers)

    def graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for spec in self.layers:
            g.add_node(spec.name, spec=spec)
        g.add_edges_from(self.edges)
        return g

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_params"] = self.total_params
        d["total_macs"] = self.total_macs
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        """Inverse of to_dict (e.g. network.json of a compile output folder)."""
        tuples = ("in_hw", "out_hw", "pool_out_hw")
        layers = []
        for ld in d["layers"]:
            ld = dict(ld)
            for k in tuples:
                if k in ld:
                    ld[k] = tuple(ld[k])
            layers.append(LayerSpec(**ld))
        return cls(
            name=d["name"],
            input_shape=tuple(d["input_shape"]),
            num_classes=int(d["num_classes"]),
            layers=layers,
            edges=[tuple(e) for e in d.get("edges", [])],
        )

    def input_of(self, index: int) -> int:
        """Index of the unit whose output activation feeds unit `index` (-1: the network
        input): the previous layer in stream order, skipping the unit's own channel groups.
        Any unit of that layer will do: its groups share one activation width."""
        g = self.layers[index].act_group
        j = index - 1
        while j >= 0 and self.layers[j].act_group == g:
            j -= 1
        return j


def split_channel_groups(net: NetworkSpec, groups: int | dict[str, int], name: str | None = None) -> NetworkSpec:
    """Split layers into output-channel groups, each its own allocation unit (its own weight
    width and folding, built as its own layer of MH / groups outputs), named
    "<layer>:g<k>". The groups of a layer read the same input and share one output
    activation width: the allocator gives them one activation variable.

    `groups` is the number of groups for every layer, or per layer name; a layer whose MH
    it does not divide (or with 1 group) is kept whole."""
    new_layers: list[LayerSpec] = []
    units_of: dict[str, list[str]] = {}
    for spec in net.layers:
        if spec.group:
            raise ValueError(f"layer {spec.name!r} is already a channel group")
        g = groups.get(spec.name, 1) if isinstance(groups, dict) else int(groups)
        if g <= 1 or spec.mh % g:
            new_layers.append(spec)
            units_of[spec.name] = [spec.name]
            continue
        names = []
        for k in range(g):
            unit = replace(spec, name=f"{spec.name}:g{k}", mh=spec.mh // g, group=spec.name, group_index=k)
            new_layers.append(unit)
            names.append(unit.name)
        units_of[spec.name] = names
    edges = [(a, b) for u, v in net.edges for a in units_of.get(u, [u]) for b in units_of.get(v, [v])]
    return NetworkSpec(
        name=name or net.name, input_shape=net.input_shape, num_classes=net.num_classes, layers=new_layers, edges=edges
    )


def network_spec(model: nn.Module, input_shape: tuple[int, int, int], name: str = "model") -> NetworkSpec:
    """Trace the conv/linear layers of `model` with one forward pass of a zero image."""
    records: list[LayerSpec] = []
    hooks = []

    def hook_for(mod_name: str, mod: nn.Module):
        def hook(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0]
                records.append(
                    LayerSpec(
                        name=mod_name,
                        kind="conv",
                        mw=k * k * module.in_channels // module.groups,
                        mh=module.out_channels,
                        out_pixels=int(output.shape[-1] * output.shape[-2]),
                        kernel=k,
                        stride=module.stride[0],
                        padding=module.padding[0] if isinstance(module.padding, tuple) else 0,
                        in_channels=module.in_channels,
                        in_hw=(int(x.shape[-2]), int(x.shape[-1])),
                        out_hw=(int(output.shape[-2]), int(output.shape[-1])),
                    )
                )
            else:
                records.append(
                    LayerSpec(
                        name=mod_name,
                        kind="linear",
                        mw=module.in_features,
                        mh=module.out_features,
                        out_pixels=1,
                        in_channels=module.in_features,
                    )
                )

        return hook

    def pool_hook(module, inputs, output):
        # a max pool right after a conv (through BN / ReLU) belongs to that conv's block
        if not records or records[-1].kind != "conv" or records[-1].pool_kernel:
            return
        if tuple(inputs[0].shape[-2:]) != records[-1].out_hw:
            return
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        s = module.stride if isinstance(module.stride, int) else module.stride[0]
        records[-1] = LayerSpec(
            **{
                **asdict(records[-1]),
                "pool_kernel": int(k),
                "pool_stride": int(s if s else k),
                "pool_out_hw": (int(output.shape[-2]), int(output.shape[-1])),
            }
        )

    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook_for(mod_name, mod)))
        elif isinstance(mod, nn.MaxPool2d):
            hooks.append(mod.register_forward_hook(pool_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if records:
        last = records[-1]
        records[-1] = LayerSpec(**{**asdict(last), "has_output_act": False})
    edges = [(a.name, b.name) for a, b in zip(records, records[1:])]
    return NetworkSpec(
        name=name,
        input_shape=tuple(input_shape),
        num_classes=int(out.shape[-1]),
        layers=records,
        edges=edges,
    )
