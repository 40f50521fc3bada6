"""The fit step's retry loop (fqhw.flow.step_fit): while FINN's estimates exceed a cap, that
resource's utilisation limit is lowered by the measured excess and the allocation solved
again; after FIT_ROUNDS it gives up in one line. FINN's totals are scripted here (the
real build is what test_compile_models checks); the export, the solves and the loop are real."""
from __future__ import annotations

import types

import pytest

import fqhw.flow as flow
from fqhw.data.synthetic import SyntheticDermConfig
from fqhw.errors import FqhwError
from fqhw.backends.finn.backend import FinnBackend
from fqhw.hwmodels import get_cost_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = flow.CompileConfig(
        data=SyntheticDermConfig(n_train=120, n_val=60, n_test=60, image_size=16), channels=(4, 8), float_epochs=1,
        cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
    )
    splits = flow.step_data(cfg)
    fm = flow.step_float_model(cfg, splits)
    sens = flow.step_importance(cfg, fm, splits)
    return cfg, fm, sens, splits


def _scripted(monkeypatch, lut_per_round):
    """FINN's LUT total per call, as fractions of the LUT cap; records the cost models it saw."""
    lim = get_cost_model("pynq-z2").limits
    calls = []

    def build(self, qonnx_path, alloc, build_dir, *, kind, model, cost_model):
        calls.append(alloc)
        frac = lut_per_round[min(len(calls), len(lut_per_round)) - 1]
        return types.SimpleNamespace(totals={"LUT": frac * lim.cap("LUT"), "BRAM_18K": 1.0, "DSP": 0.0})

    monkeypatch.setattr(FinnBackend, "build", build)
    return calls, lim


def test_fit_lowers_the_cap_by_the_excess_and_solves_again(tiny, monkeypatch):
    cfg, fm, sens, splits = tiny
    calls, lim = _scripted(monkeypatch, [1.25, 0.9])
    first = flow.step_allocate(cfg, fm.net, sens)
    got = flow.step_fit(cfg, fm, first, sens, splits)
    rounds = got.solver["finn_fit"]
    assert len(rounds) == len(calls) == 2
    assert rounds[0]["over"] == {"LUT": pytest.approx(1.25)} and rounds[1]["over"] == {}
    # the second solve ran with the LUT limit lowered by the excess, times the margin
    assert rounds[1]["utilisation"]["LUT"] == pytest.approx(lim.utilisation["LUT"] * flow.FIT_MARGIN / 1.25)
    assert rounds[0]["utilisation"] == dict(lim.utilisation)
    # and that solve's allocation is what came back (its own LUT estimate within the lowered cap)
    assert got.solver["caps"]["LUT"] <= lim.totals["LUT"] * rounds[1]["utilisation"]["LUT"] + 1e-6
    assert got.solver["caps"]["LUT"] < first.solver["caps"]["LUT"]


def test_fit_returns_at_once_when_the_first_build_fits(tiny, monkeypatch):
    cfg, fm, sens, splits = tiny
    calls, _ = _scripted(monkeypatch, [0.8])
    first = flow.step_allocate(cfg, fm.net, sens)
    got = flow.step_fit(cfg, fm, first, sens, splits)
    assert len(calls) == 1 and got is first and len(got.solver["finn_fit"]) == 1


def test_fit_gives_up_after_its_rounds_in_one_line(tiny, monkeypatch):
    cfg, fm, sens, splits = tiny
    calls, _ = _scripted(monkeypatch, [1.3])
    with pytest.raises(FqhwError) as e:
        flow.step_fit(cfg, fm, flow.step_allocate(cfg, fm.net, sens), sens, splits)
    assert len(calls) == flow.FIT_ROUNDS
    msg = str(e.value)
    assert "\n" not in msg and f"after {flow.FIT_ROUNDS} re-allocations" in msg and "LUT 130 % of the cap" in msg
