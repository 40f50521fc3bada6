"""Property: on any small network and any allocation, the backends agree on every integer.

Hypothesis draws a FairCNN (1-3 conv blocks of 2..8 channels, 8/12/16-pixel images, 2..4
classes), per-layer weight and activation widths (2..8 bits), a FINN folding (PE | MH,
SIMD | MW) and a seed for the weights, the BatchNorm statistics, the calibration images and
the test images. Each example runs the compile's back half as the flow does (calibrate,
snap_thresholds, export_qonnx, finn_build) and requires the integer traces of Brevitas
(float64 twin, and the float32 model itself, which snapping is meant to make exact), QONNX
(float64) and FINN's dataflow graph to be equal, element for element, and FINN's integer
thresholds to be the float64 ones from the QONNX file.

The fast integer simulator (fqhw.backends.intsim, `fqhw simulate`) joins each comparison:
built from FINN's dataflow graph here, from the power-of-two QONNX file for hls4ml.

hls4ml joins in its own test (`test_po2_brevitas_qonnx_and_hls4ml_agree_on_every_integer`):
the same drawn networks and allocations, quantized with the power-of-two scheme hls4ml
computes exactly, Brevitas-po2 vs QONNX vs the simulator vs hls4ml's C simulation; a few
examples only, since each compiles a C simulation with g++.

The hand-picked cases in test_backends.py show the flow works on two shapes; this one looks
for the shapes and widths nobody picked. It is bounded for CI: `max_examples=8`,
`derandomize=True` (the same examples on every run, no example database), about 30 s on
one core (hypothesis is in the `test` extra). `FQHW_PROPERTY_EXAMPLES=N` runs N examples
instead, and `FQHW_PROPERTY_RANDOM=1` draws fresh ones on every run (a longer local search).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from fqhw.allocator.allocation import Allocation, LayerAllocation
from fqhw.backends.finn.build import finn_build
from fqhw.backends.finn.execute import finn_integer_trace
from fqhw.backends.intsim import IntegerSimulator
from fqhw.backends.qonnx_export import export_qonnx, qonnx_integer_trace
from fqhw.backends.verify import check_bit_exact
from fqhw.models.cnn import CNNConfig, FairCNN
from fqhw.quant.qmodel import build_quant_model, calibrate, integer_trace
from fqhw.quant.snap import snap_thresholds

EXAMPLES = int(os.environ.get("FQHW_PROPERTY_EXAMPLES", "8"))
# FQHW_PROPERTY_RANDOM=1: fresh random examples on every run (a local search beyond CI's)
DERANDOMIZE = not os.environ.get("FQHW_PROPERTY_RANDOM")
N_CALIB = 16  # calibration images
N_TEST = 3  # images whose traces are compared


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def cases(draw):
    """A network, an allocation for it and a seed."""
    n_conv = draw(st.integers(1, 3), label="conv layers")
    channels = tuple(draw(st.lists(st.integers(2, 8), min_size=n_conv, max_size=n_conv), label="channels"))
    cfg = CNNConfig(
        image_size=draw(st.sampled_from([8, 12, 16]), label="image size"),
        channels=channels,
        num_classes=draw(st.integers(2, 4), label="classes"),
    )
    layers = []
    c_in = cfg.in_channels
    for i, c_out in enumerate(channels):  # conv: MW = 3 * 3 * C_in inputs, MH = C_out outputs
        layers.append(
            LayerAllocation(
                f"features.{i}.conv",
                weight_bits=draw(st.integers(2, 8), label=f"features.{i} weight bits"),
                act_bits=draw(st.integers(2, 8), label=f"features.{i} act bits"),
                pe=draw(st.sampled_from(_divisors(c_out)), label=f"features.{i} PE"),
                simd=draw(st.sampled_from(_divisors(9 * c_in)), label=f"features.{i} SIMD"),
            )
        )
        c_in = c_out
    layers.append(
        LayerAllocation(
            "head",
            weight_bits=draw(st.integers(2, 8), label="head weight bits"),
            act_bits=None,
            pe=draw(st.sampled_from(_divisors(cfg.num_classes)), label="head PE"),
            simd=draw(st.sampled_from(_divisors(c_in)), label="head SIMD"),
        )
    )
    seed = draw(st.integers(0, 2**16 - 1), label="seed")
    return cfg, Allocation("pynq-z2", layers), seed


def _images(cfg: CNNConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random uint8 pixels as the model sees them (pixel / 256)."""
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    return torch.randint(0, 256, shape, generator=gen).float() / 256


def _float_model(cfg: CNNConfig, seed: int):
    """Random weights and BatchNorm affine parameters (some gammas negative, so that FINN's
    sign flips and the po2 scheme's BN folding are exercised), BatchNorm statistics those of
    the calibration images (as in a trained network) then perturbed, so that every layer's
    pre-activations straddle its ReLU. Returns (float model, calibration images, the
    generator that draws the test images next)."""
    torch.manual_seed(seed)
    fm = FairCNN(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    calib = _images(cfg, N_CALIB, gen)
    with torch.no_grad():
        for bn in (b.bn for b in fm.features):
            bn.weight.uniform_(-1.5, 1.5)
            bn.weight[0] = bn.weight[0].abs() + 0.5  # at least one channel passes its ReLU
            bn.bias.uniform_(-0.5, 0.5)
            bn.reset_running_stats()
            bn.momentum = None  # running statistics = those of the one batch below
        fm.train()
        fm(calib)
        fm.eval()
        for bn in (b.bn for b in fm.features):
            bn.running_mean.add_(0.2 * torch.randn(bn.num_features) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty(bn.num_features).uniform_(0.7, 1.4))
    return fm, calib, gen


def _quant_model(cfg: CNNConfig, alloc: Allocation, seed: int):
    """The FINN-scheme quant model of `_float_model`, calibrated on its images and snapped,
    as the flow does after fine-tuning. Returns the model and the test images."""
    fm, calib, gen = _float_model(cfg, seed)
    qm = build_quant_model(fm, alloc)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, N_CALIB, 8)], batches=N_CALIB // 8)
    qm.eval()
    snap_thresholds(qm)
    return qm, _images(cfg, N_TEST, gen)


def _pixels(x: torch.Tensor):
    """The uint8 pixel codes of images given as pixel / 256 (what the simulator takes)."""
    return torch.round(x * 256).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- the property


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(case=cases())
def test_backends_agree_on_every_integer(case):
    cfg, alloc, seed = case
    note(f"network {cfg}")
    note("allocation " + ", ".join(f"{la.name} W{la.weight_bits}/A{la.act_bits} PE{la.pe}/SIMD{la.simd}" for la in alloc.layers))
    note(f"seed {seed}")
    torch.set_num_threads(1)
    qm, x = _quant_model(cfg, alloc, seed)
    reference = integer_trace(qm, x)  # float64 twin: the exact reference
    # an example where some layer's activations are all one code tests nothing there:
    # drawn again (about one in six, mostly narrow layers whose few channels all round to 0)
    acts = [reference[f"{la.name}.act"] for la in alloc.layers[:-1]]
    assume(all(a.max() > a.min() for a in acts))
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    with tempfile.TemporaryDirectory(prefix="fqhw-property-") as tmp:
        work = Path(tmp)
        qonnx_path = export_qonnx(qm, shape, work / "model.qonnx.onnx")
        build = finn_build(qonnx_path, alloc, work / "finn")
        traces = {
            "brevitas": reference,
            "brevitas_fp32": integer_trace(qm, x, precision="float32"),
            "qonnx": qonnx_integer_trace(qonnx_path, x),
            "finn": finn_integer_trace(build, x),
            # the fast simulator, read from the same dataflow graph (fqhw simulate's)
            "intsim": _without_logits(
                IntegerSimulator.from_models(build.dataflow_model, build.parent_model, build.mvau_of_layer).run(_pixels(x))
            ),
        }
        # the folding reached FINN as allocated, and FINN's folding file for the Vivado
        # machine carries it
        folding = json.loads(Path(build.folding_config).read_text())
        for la in alloc.layers:
            est = build.layer_estimates[la.name]
            assert (est["pe"], est["simd"]) == (la.pe, la.simd), la.name
            node = folding[build.mvau_of_layer[la.name]]
            assert (node["PE"], node["SIMD"]) == (la.pe, la.simd), la.name
    expected = {"input"} | {f"{la.name}.act" for la in alloc.layers[:-1]} | {"head.acc"}
    for backend, trace in traces.items():
        assert set(trace) == expected, backend
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    # FINN's float32-derived integer thresholds equal the float64 ones from the QONNX file
    # (a differing threshold gives some accumulator value another code, even where these
    # few images do not reach it)
    check = build.threshold_check
    assert check["ok"], {k: v for k, v in check["layers"].items() if v["differing"]}


def _without_logits(trace: dict) -> dict:
    return {k: v for k, v in trace.items() if k != "logits"}


# ----------------------------------------------------------------------------- hls4ml
#
# hls4ml is exact only with power-of-two scales (shared/notes/toolchain.md), so it gets its
# own quant model from the same float model and allocation (fqhw.quant.po2: BatchNorm
# folded, quantized bias, po2 weight and activation scales) and its own comparison: the po2
# Brevitas model (its exact float64 twin), qonnx's execution of its QONNX export, the
# simulator built from that file (IntegerSimulator.from_qonnx: `fqhw simulate` on an
# hls4ml build) and hls4ml's C simulation of the project built from it. Each example
# compiles a C simulation with g++ (7-18 s on 2 cores), so this runs a handful of the same
# drawn networks: HLS4ML_EXAMPLES (FQHW_PROPERTY_HLS4ML_EXAMPLES=N for more).

HLS4ML_EXAMPLES = int(os.environ.get("FQHW_PROPERTY_HLS4ML_EXAMPLES", "3"))


@pytest.mark.slow
@settings(
    max_examples=HLS4ML_EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(case=cases())
def test_po2_brevitas_qonnx_and_hls4ml_agree_on_every_integer(case):
    from fqhw.backends.hls4ml.build import hls4ml_build
    from fqhw.backends.hls4ml.csim import hls4ml_integer_trace
    from fqhw.quant.po2 import build_po2_model, po2_integer_trace

    cfg, alloc, seed = case
    note(f"network {cfg}")
    note("allocation " + ", ".join(f"{la.name} W{la.weight_bits}/A{la.act_bits} PE{la.pe}/SIMD{la.simd}" for la in alloc.layers))
    note(f"seed {seed}")
    torch.set_num_threads(1)
    fm, calib, gen = _float_model(cfg, seed)
    qm = build_po2_model(fm, alloc)
    calibrate(qm, [(calib[i : i + 8],) for i in range(0, N_CALIB, 8)], batches=N_CALIB // 8)
    qm.eval()
    x = _images(cfg, N_TEST, gen)
    reference = po2_integer_trace(qm, x)
    acts = [reference[f"{la.name}.act"] for la in alloc.layers[:-1]]
    assume(all(a.max() > a.min() for a in acts))  # as above: a constant layer tests nothing
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    with tempfile.TemporaryDirectory(prefix="fqhw-property-hls4ml-") as tmp:
        work = Path(tmp)
        qonnx_path = export_qonnx(qm, shape, work / "model.qonnx.onnx")
        build = hls4ml_build(qonnx_path, alloc, work / "hls4ml")
        traces = {
            "brevitas_po2": reference,
            "qonnx": qonnx_integer_trace(qonnx_path, x),
            "intsim": _without_logits(IntegerSimulator.from_qonnx(qonnx_path).run(_pixels(x))),
            "hls4ml": hls4ml_integer_trace(build, x),
        }
    expected = {"input"} | {f"{la.name}.act" for la in alloc.layers[:-1]} | {"head.acc"}
    for backend, trace in traces.items():
        assert set(trace) == expected, backend
    result = check_bit_exact(traces)
    assert result.ok, result.first_mismatch
    # the folding reached hls4ml: ReuseFactor MW * MH / (PE * SIMD) requested for every layer
    c_in, dims = cfg.in_channels, {}
    for i, c_out in enumerate(cfg.channels):
        dims[f"features.{i}.conv"], c_in = (9 * c_in, c_out), c_out
    dims["head"] = (c_in, cfg.num_classes)
    for la in alloc.layers:
        mw, mh = dims[la.name]
        assert build.reuse_factors[la.name]["requested"] == (mw // la.simd) * (mh // la.pe), la.name
