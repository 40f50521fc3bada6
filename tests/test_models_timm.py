"""timm models through the middle of the flow: registry, NetworkSpec (edges, residual joins),
Brevitas quantization of a ResNet-18 at a mixed allocation, QONNX export, bit-exactness of
Brevitas / qonnx / FINN's HW graph, and FINN's refusal of a transformer.

Sizes are cut for CPU time, never the topology: the ResNet-18 keeps its 20 convs, 8
residual blocks and 3 downsample convs but has channels (64, 16, 16, 16) (timm's plain
stem is always 64 wide) and 64 x 64 inputs (the smallest side where layer4's 3 x 3 convs
still see a 2 x 2 map, which qonnx's Im2Col needs); DeiT has depth 1, width 32.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.errors import FqhwError
from fqhw.models import registry
from fqhw.models.cnn import FairCNN
from fqhw.network import NetworkSpec, network_spec

SIZE = 64
NARROW = dict(channels=(64, 16, 16, 16))


def _images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 256


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, about half the channels with a negative scale
    (FINN moves those signs into the weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.weight.copy_(3 * torch.rand(c, generator=g) - 1.5)
                m.bias.copy_(0.6 * torch.rand(c, generator=g) - 0.3)


def _mixed_allocation(net: NetworkSpec) -> Allocation:
    """Weights 2..8 and activations 2..8 bits cycling over the layers; a downsample conv
    takes its block's join width (the shared quantizer of the residual add). PE 2 and
    SIMD 3 where they divide the layer's matrix."""
    layers = []
    for i, s in enumerate(net.layers):
        w = 2 + (3 * i) % 7
        a = 2 + (5 * i + 1) % 7 if s.has_output_act else None
        layers.append(LayerAllocation(s.name, w, a, pe=2 if s.mh % 2 == 0 else 1, simd=3 if s.mw % 3 == 0 else 1))
    by_name = {la.name: la for la in layers}
    for join in net.joins:
        for other in join[1:]:
            if ".downsample." in other:
                by_name[other].act_bits = by_name[join[0]].act_bits
    return Allocation("pynq-z2", layers)


# --------------------------------------------------------------------------- registry


def test_known_models_and_unknown_name():
    assert registry.known_models() == ["fqcnn", "cnv", "resnet18", "resnet50", "deit_tiny_patch16_224", "tiny_vit_5m_224"]
    with pytest.raises(FqhwError) as e:
        registry.create("resnet19", 4, 32)
    msg = str(e.value)
    assert "\n" not in msg and "resnet19" in msg
    assert all(n in msg for n in registry.known_models())
    assert isinstance(registry.create("fqcnn", 4, 32), FairCNN)


def test_create_never_downloads(monkeypatch):
    import timm

    calls = []
    real = timm.create_model

    def spy(name, **kw):
        calls.append((name, kw))
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", spy)
    m = registry.create("deit_tiny_patch16_224", 3, 32, depth=1, embed_dim=32, num_heads=2)
    assert not m.training
    (name, kw), = calls
    assert name == "deit_tiny_patch16_224" and kw["pretrained"] is False and kw["img_size"] == 32
    assert "checkpoint_path" not in kw and kw["num_classes"] == 3 and kw["in_chans"] == 3
    with pytest.raises(FqhwError, match="pretrained is not accepted"):
        registry.create("resnet18", 3, 32, pretrained=True)
    with pytest.raises(FqhwError, match="multiple of the patch size"):
        registry.create("deit_tiny_patch16_224", 3, 40)


class _RunsCode:
    def __reduce__(self):  # a pickle that would call print when loaded
        return (print, ("pwned",))


def test_checkpoint_loading(tmp_path):
    a = registry.create("resnet18", 4, 32, **NARROW)
    path = tmp_path / "r18.pt"
    torch.save(a.state_dict(), path)
    b = registry.create("resnet18", 4, 32, checkpoint=path, **NARROW)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    bad = tmp_path / "code.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"conv1.weight": _RunsCode()}, fh)
    with pytest.raises(FqhwError, match="weights-only|cannot be read"):
        registry.create("resnet18", 4, 32, checkpoint=bad, **NARROW)
    with pytest.raises(FqhwError, match="does not fit the model"):  # a FairCNN's weights
        torch.save(FairCNN().state_dict(), tmp_path / "cnn.pt")
        registry.create("resnet18", 4, 32, checkpoint=tmp_path / "cnn.pt", **NARROW)
    with pytest.raises(FqhwError, match="not found"):
        registry.create("resnet18", 4, 32, checkpoint=tmp_path / "missing.pt")


# --------------------------------------------------------------------------- network spec


def test_network_spec_resnets():
    m = registry.create("resnet18", 4, 32)
    net = network_spec(m, (3, 32, 32), name="resnet18")
    kinds = [s.kind for s in net.layers]
    assert len(net.layers) == 21 and kinds.count("conv") == 20 and kinds[-1] == "linear"
    assert net.total_params == sum(x.weight.numel() for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
    assert net.layers[-1].name == "fc" and not net.layers[-1].has_output_act
    assert len(net.joins) == 8
    assert ("layer2.0.conv2", "layer2.0.downsample.0") in net.joins
    assert ("layer1.0.conv2", "conv1") in net.joins  # identity shortcut: the stem's output
    assert sorted(len(g) for g in net.join_groups()) == [3, 3, 3, 3]
    # the downsample conv reads the block input, not the conv before it in stream order
    idx = [s.name for s in net.layers].index("layer2.0.downsample.0")
    assert net.layers[net.input_of(idx)].name == "layer1.1.conv2"
    assert ("layer1.1.conv2", "layer2.0.downsample.0") in net.edges
    assert NetworkSpec.from_dict(net.to_dict()) == net
    r50 = network_spec(registry.create("resnet50", 4, 32), (3, 32, 32))
    assert len(r50.layers) == 54 and len(r50.joins) == 16


def test_network_spec_chain_unchanged():
    """FairCNN keeps the stream-order edges and has no joins (backward compatible)."""
    net = network_spec(FairCNN(), (3, 32, 32))
    names = [s.name for s in net.layers]
    assert net.edges == list(zip(names, names[1:])) and net.joins == []
    assert [net.input_of(i) for i in range(len(names))] == [-1, 0, 1, 2]


def test_network_spec_transformers():
    deit = registry.create("deit_tiny_patch16_224", 3, 32, depth=2, embed_dim=32, num_heads=2)
    net = network_spec(deit, (3, 32, 32))
    assert len(net.layers) == 1 + 2 * 4 + 1  # patch embed, (qkv, proj, fc1, fc2) per block, head
    assert net.layer("blocks.0.attn.qkv").out_pixels == 5  # 2 x 2 patches + the class token
    assert net.layer("head").out_pixels == 1 and len(net.joins) == 4
    tv = network_spec(registry.create("tiny_vit_5m_224", 3, 32), (3, 32, 32))
    assert len(tv.layers) == 68 and tv.joins


# --------------------------------------------------------------------------- ResNet-18 quantized


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from fqhw.backends.qonnx_generic import export_generic_qonnx
    from fqhw.quant.generic import quantize_model
    from fqhw.quant.resnet_snap import snap_resnet_thresholds
    from fqhw.quant.qmodel import calibrate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fm = registry.create("resnet18", 4, SIZE, **NARROW)
    _randomise_bn(fm)
    net = network_spec(fm, (3, SIZE, SIZE), name="resnet18")
    alloc = _mixed_allocation(net)
    qm = quantize_model(fm, alloc)
    calib = _images(16, seed=1)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, 16, 8)], batches=2)
    qm.eval()
    snap = snap_resnet_thresholds(qm)  # code boundaries off the integers, as the FairCNN flow does
    root = tmp_path_factory.mktemp("resnet18")
    path = export_generic_qonnx(qm, (3, SIZE, SIZE), root / "model.onnx")
    return {"float": fm, "net": net, "alloc": alloc, "q": qm, "path": path, "root": root, "snap": snap}


def test_resnet18_allocation_is_mixed(resnet):
    from fqhw.quant.resnet_snap import resnet_threshold_margins

    assert len(resnet["snap"]["layers"]) == 20 and resnet["snap"]["min_margin"] >= 1e-3
    assert min(resnet_threshold_margins(resnet["q"]).values()) >= 1e-3
    alloc = resnet["alloc"]
    assert {la.weight_bits for la in alloc.layers} == set(range(2, 9))
    assert {la.act_bits for la in alloc.layers if la.act_bits} == set(range(2, 9))


def test_resnet18_refusals(resnet, tmp_path):
    from fqhw.backends.qonnx_generic import export_generic_qonnx
    from fqhw.quant.generic import quantize_model

    with pytest.raises(FqhwError, match="at least 64 x 64"):
        export_generic_qonnx(resnet["q"], (3, 32, 32), tmp_path / "small.onnx")

    layers = [LayerAllocation(la.name, la.weight_bits, la.act_bits) for la in resnet["alloc"].layers]
    ds = next(la for la in layers if la.name == "layer3.0.downsample.0")
    ds.act_bits = 2 if ds.act_bits != 2 else 3
    with pytest.raises(FqhwError, match="residual add needs one activation width"):
        quantize_model(resnet["float"], Allocation("pynq-z2", layers))


def test_resnet18_brevitas_equals_qonnx(resnet):
    from fqhw.backends.qonnx_generic import compare_traces, qonnx_integer_trace_generic
    from fqhw.quant.generic import integer_trace

    x = _images(2, seed=2)
    ref = integer_trace(resnet["q"], x)
    got = qonnx_integer_trace_generic(resnet["path"], x)
    cmp = compare_traces(ref, got)
    assert {k for k in ref if k.endswith(".shortcut")} == {f"layer{s}.1.shortcut" for s in range(1, 5)} | {"layer1.0.shortcut"}
    assert sum(1 for k in ref if k.endswith(".out")) == 8 and "fc.acc" in ref
    assert sum(v["n"] for v in cmp.values()) > 100_000
    assert {k: v for k, v in cmp.items() if v["differ"]} == {}


@pytest.mark.slow
def test_resnet18_finn_all_hw_and_bit_exact(resnet):
    from fqhw.backends.finn.residual import finn_dataflow_integer_trace, finn_dataflow_resnet, require_all_hw
    from fqhw.backends.qonnx_generic import compare_traces
    from fqhw.quant.generic import integer_trace

    res = require_all_hw(finn_dataflow_resnet(resnet["path"], resnet["root"] / "finn", alloc=resnet["alloc"]), "resnet18")
    ops = res.hw_op_counts
    assert ops["MVAU"] == 21 and ops["ElementwiseAdd"] == 8 and ops["DuplicateStreams"] == 8
    assert ops["Thresholding"] == 8 + 5  # the ReLU after each add, each identity shortcut's requantization
    assert sorted(h.split(" (")[1] for h in res.host_nodes) == ["Add)", "Mul)", "Transpose)"]
    # the folded, specialized partition and FINN's estimates
    assert len(res.folding) == 21 and res.folding and all(f["PE"] in (1, 2) for f in res.folding.values())
    assert res.estimates["fps"] > 0 and res.estimates["total"]["LUT"] > 0
    x = _images(8, seed=3)
    ref = integer_trace(resnet["q"], x)
    for graph in ("hw", "dataflow"):
        got = finn_dataflow_integer_trace(res, resnet["path"], x, graph=graph)
        cmp = compare_traces(ref, got, ("brevitas", f"finn {graph}"))
        assert {k: v for k, v in cmp.items() if v["differ"]} == {}, graph


# --------------------------------------------------------------------------- transformers


def test_deit_export_runs_and_finn_refuses(tmp_path):
    from fqhw.backends.finn.residual import finn_refusal
    from fqhw.backends.qonnx_generic import export_transformer_qonnx, qonnx_execute
    from fqhw.quant.generic import quantize_model
    from fqhw.quant.qmodel import calibrate

    torch.manual_seed(0)
    fm = registry.create("deit_tiny_patch16_224", 3, 32, depth=1, embed_dim=32, num_heads=2)
    net = network_spec(fm, (3, 32, 32))
    qm = quantize_model(fm, Allocation.uniform(net, 6))
    x = _images(4, seed=4, size=32)
    calibrate(qm, [(x,)], batches=1)
    qm.eval()
    path = export_transformer_qonnx(qm, (3, 32, 32), tmp_path / "deit.onnx")
    with torch.no_grad():
        ref = qm(x[:2]).numpy()
    np.testing.assert_allclose(qonnx_execute(path, x[:2]), ref, rtol=1e-4, atol=1e-5)
    err = finn_refusal(path, "deit_tiny_patch16_224", tmp_path / "finn")
    assert isinstance(err, FqhwError)
    msg = str(err)
    assert "\n" not in msg and msg.startswith("FINN cannot build deit_tiny_patch16_224: unsupported ops ")
    assert "MatMul x" in msg and msg.endswith("QONNX export and the ASIC cost models still work")


@pytest.mark.slow
def test_tinyvit_brevitas_equals_qonnx_at_the_integer_level(tmp_path):
    """TinyViT (window attention, conv + BN stages) quantized, exported and run by qonnx in
    float64: every quantizer's codes equal Brevitas' (its windows are a batch of images x
    windows: the traces are compared per image). At 64 px: at 32 px the last stage's map is
    1 pixel high, which qonnx's Im2Col refuses."""
    from fqhw.backends.verify import check_bit_exact
    from fqhw.backends.qonnx_generic import export_transformer_qonnx, qonnx_integer_trace_transformer
    from fqhw.quant.generic import integer_trace, quantize_model
    from fqhw.quant.qmodel import calibrate

    torch.manual_seed(0)
    fm = registry.create("tiny_vit_5m_224", 3, 64, embed_dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    net = network_spec(fm, (3, 64, 64))
    qm = quantize_model(fm, _mixed_allocation(net))
    x = _images(2, seed=4, size=64)
    calibrate(qm, [(x,)], batches=1)
    qm.eval()
    path = export_transformer_qonnx(qm, (3, 64, 64), tmp_path / "tinyvit.onnx")
    ref = integer_trace(qm, x[:1])
    got = qonnx_integer_trace_transformer(path, x[:1])
    assert set(ref) == set(got) and len(ref) == 30
    assert any(v.ndim >= 3 and v.shape[1] > 1 for k, v in ref.items() if ".attn." in k)  # windows kept per image
    res = check_bit_exact({"brevitas": ref, "qonnx": got})
    assert res.ok, res.first_mismatch
    assert sum(v.size for v in ref.values()) > 50_000
