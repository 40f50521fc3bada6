"""NetworkSpec / LayerSpec: what a cost model and the allocator need to know of a model.

Read from the float model once (shapes by a forward pass with hooks), so the allocator and
the cost models never touch torch.

The data flow between the layers (`NetworkSpec.edges`) and the residual joins
(`NetworkSpec.joins`) are read in the same pass by following, through every torch
function the forward calls, which compute layer last wrote each tensor (`_Provenance`):
a chain such as FairCNN gives the chain of edges it always had, a ResNet gives its
shortcut edges and one join per residual add.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode


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
    # residual joins: per elementwise add of two tensors written by different layers, the
    # names of those layers (activation-group names: a channel-split layer keeps its name
    # here), the add's first operand (a ResNet block's last conv) first. Hardware adds the
    # two operands code by code (FINN's ElementwiseAdd), so they need one width and scale:
    # fqhw.quant.generic quantizes both with one shared quantizer of the first layer's
    # act_bits, so a conv operand (a downsample conv) must have those act_bits too, while an
    # identity shortcut (the previous block's output) is requantized and may differ.
    joins: list[tuple[str, ...]] = field(default_factory=list)

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
            joins=[tuple(j) for j in d.get("joins", [])],
        )

    def input_of(self, index: int) -> int:
        """Index of the unit whose output activation feeds unit `index` (-1: the network
        input). Any unit of that layer will do: its groups share one activation width; the
        last of them before `index` is returned.

        Without edges: the previous layer in stream order, skipping the unit's own channel
        groups. With edges (every NetworkSpec `network_spec` makes): the layer an edge comes
        from, so that a ResNet's downsample conv reads the block input rather than the conv
        before it in stream order; a unit with no incoming edge reads the network input. On
        a chain both rules give the same answer."""
        g = self.layers[index].act_group
        if not self.edges:
            j = index - 1
            while j >= 0 and self.layers[j].act_group == g:
                j -= 1
            return j
        name = self.layers[index].name
        group_of = {s.name: s.act_group for s in self.layers}
        sources = {group_of.get(a, a) for a, b in self.edges if b == name and group_of.get(a, a) != g}
        for j in range(index - 1, -1, -1):
            if self.layers[j].act_group in sources:
                return j
        return -1

    def join_groups(self) -> list[set[str]]:
        """The joins merged where they share a layer: the sets of layers an "every join at
        one width" constraint ties together (e.g. all block outputs of a ResNet stage,
        chained by identity shortcuts, with the stage's downsample conv)."""
        g = nx.Graph()
        for join in self.joins:
            g.add_nodes_from(join)
            g.add_edges_from(zip(join, join[1:]))
        return [set(c) for c in nx.connected_components(g)]


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
        name=name or net.name,
        input_shape=net.input_shape,
        num_classes=net.num_classes,
        layers=new_layers,
        edges=edges,
        joins=list(net.joins),
    )


_ADD_FUNCS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})


def _tensors(obj):
    """The tensors in a (nested) structure of arguments or results."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Provenance(TorchFunctionMode):
    """Which compute layer last wrote each tensor, followed through every torch function.

    A conv / linear output is tagged with the layer's name (by its forward hook, `mark`);
    any other function passes on the tag of its first tagged tensor argument, so BN, ReLU,
    pooling, reshapes and the like are transparent. An add of tensors with different tags
    is a residual join: it is recorded (the tags in operand order) and its result keeps the
    first operand's tag. ResNet blocks write `x += shortcut` with the residual branch
    first, so a block output belongs to the block's last conv, whose output activation is
    the one the join's width is allocated to. Tagged tensors are kept alive for the pass so
    that no id is reused."""

    def __init__(self):
        super().__init__()
        self._tag: dict[int, str] = {}
        self._alive: list[torch.Tensor] = []
        self.joins: list[tuple[str, ...]] = []

    def tag_of(self, t) -> str | None:
        return self._tag.get(id(t)) if isinstance(t, torch.Tensor) else None

    def mark(self, t, name: str) -> None:
        self._tag[id(t)] = name
        self._alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = [tg for tg in (self._tag.get(id(t)) for t in _tensors((args, kwargs))) if tg is not None]
        if tags:
            distinct = tuple(dict.fromkeys(tags))
            if len(distinct) > 1 and getattr(func, "__name__", "") in _ADD_FUNCS and distinct not in self.joins:
                self.joins.append(distinct)
            for t in _tensors(out):
                self.mark(t, tags[0])
        return out


def network_spec(model: nn.Module, input_shape: tuple[int, int, int], name: str = "model") -> NetworkSpec:
    """Trace the conv/linear layers of `model` with one forward pass of a zero image.

    Layers are listed in execution order. `edges` are the data flow between them (an edge
    (a, b): layer b reads what layer a wrote, through any non-compute ops), `joins` the
    residual adds (see `_Provenance`). A linear layer applied to every token of a sequence
    (a transformer's) has out_pixels = the number of tokens, so its MACs are counted for
    each."""
    records: list[LayerSpec] = []
    hooks = []
    prov = _Provenance()
    edges: list[tuple[str, str]] = []

    def pre_hook_for(mod_name: str):
        def pre_hook(module, inputs):
            src = prov.tag_of(inputs[0]) if inputs else None
            if src is not None and (src, mod_name) not in edges:
                edges.append((src, mod_name))

        return pre_hook

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
                rows = int(output.numel() // max(1, int(output.shape[0]) * int(output.shape[-1]))) if output.dim() > 2 else 1
                records.append(
                    LayerSpec(
                        name=mod_name,
                        kind="linear",
                        mw=module.in_features,
                        mh=module.out_features,
                        out_pixels=rows,
                        in_channels=module.in_features,
                    )
                )
            prov.mark(output, mod_name)

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
            hooks.append(mod.register_forward_pre_hook(pre_hook_for(mod_name)))
            hooks.append(mod.register_forward_hook(hook_for(mod_name, mod)))
        elif isinstance(mod, nn.MaxPool2d):
            hooks.append(mod.register_forward_hook(pool_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), prov:
            out = model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if records:
        last = records[-1]
        records[-1] = LayerSpec(**{**asdict(last), "has_output_act": False})
    names = {r.name for r in records}
    if len(names) != len(records):
        raise ValueError(f"{name}: a compute layer runs more than once in one forward pass (shared weights are not supported)")
    return NetworkSpec(
        name=name,
        input_shape=tuple(input_shape),
        num_classes=int(out.shape[-1]),
        layers=records,
        edges=edges,
        joins=list(prov.joins),
    )
