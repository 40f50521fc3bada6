"""`fqhw compare`: allocations differ where the targets' costs differ, each is best on its own
target, outputs are written whole or not at all, and bad requests fail in one line."""
from __future__ import annotations

import json

import pytest

from fqhw import cli
from fqhw.compare import compare
from fqhw.compareresult import objective_value
from fqhw.errors import FqhwError
from fqhw.models.cnn import FairCNN
from fqhw.network import network_spec

from conftest import sensitivity




@pytest.fixture(scope="module")
def net():
    return network_spec(FairCNN(), (3, 32, 32), name="fqcnn")


@pytest.fixture(scope="module")
def sens(net):
    return sensitivity(net)


def widths(res, t):
    return [(la["weight_bits"], la["act_bits"]) for la in res.allocations[t]["layers"]]


def test_allocations_differ_and_each_is_best_on_its_own_target(net, sens):
    targets = ["bitfusion", "bitserial", "stripes", "pynq-z2"]
    res = compare(net, sens, targets, 4.0, loss_slack=0.1, edge_bits=None, time_limit_s=10)
    assert res.objectives == {"bitfusion": "latency", "bitserial": "latency", "stripes": "latency", "pynq-z2": "throughput"}
    # Bit Fusion pays for odd widths as for the next even one, Loom-like bit-serial does not,
    # Stripes pays only for activation bits: their best widths differ
    assert widths(res, "bitfusion") != widths(res, "bitserial")
    assert widths(res, "stripes") != widths(res, "bitserial")
    for t in targets:
        assert res.allocations[t]["solver"]["status"] == "OPTIMAL"
        assert res.cross[t][t] is res.own[t]
        assert all(res.cross[src][t]["fits"] for src in targets)
        obj = res.objectives[t]
        mine = objective_value(res.cross[t][t], obj)
        limit = res.own[t]["loss_limit"]
        for src in targets:
            m = res.cross[src][t]
            assert m["worst_group_loss"] == pytest.approx(res.own[src]["worst_group_loss"])  # widths travel unchanged
            if m["worst_group_loss"] <= limit * (1 + 1e-6):
                v = objective_value(m, obj)
                assert mine <= v + 1e-9 * abs(v) + 1e-12, (t, src)
        assert res.own_best[t]
    # the ASIC targets share one loss limit (nothing caps them), so every ASIC allocation is
    # admissible on every ASIC target: "best on its own target" is a real comparison there
    asics = targets[:3]
    for t in asics:
        for src in asics:
            assert res.cross[src][t]["worst_group_loss"] <= res.own[t]["loss_limit"] * (1 + 1e-6)
        assert res.cross["bitserial"][t]["energy_uJ"] > 0
    # an allocation priced elsewhere keeps its widths; the FPGA refolds them
    assert res.cross["bitfusion"]["pynq-z2"]["folding"] != [[1, 1]] * len(net.layers)
    assert res.cross["pynq-z2"]["bitserial"]["folding"] == [[1, 1]] * len(net.layers)


def test_compare_writes_json_markdown_png(net, sens, tmp_path):
    out = tmp_path / "cmp"
    res = compare(net, sens, "bitfusion,bitserial", 4.0, loss_slack=0.1, out_dir=out, time_limit_s=10)
    assert res.out_dir == str(out.absolute())
    names = sorted(p.name for p in out.iterdir())
    assert names == ["allocation-bitfusion.json", "allocation-bitserial.json", "compare.json", "compare.md", "widths.png"]
    data = json.loads((out / "compare.json").read_text())
    assert data["targets"] == ["bitfusion", "bitserial"] and set(data["cross"]["bitfusion"]) == {"bitfusion", "bitserial"}
    assert data["pinned"] == {"features.0.conv": 8, "head": 8}  # compile's default: edge layers at 8 bits
    md = (out / "compare.md").read_text()
    assert "## Cross table" in md and "| bitserial |" in md and "Energy" in md
    assert (out / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_failed_write_leaves_nothing_half_written(net, sens, tmp_path, monkeypatch):
    import fqhw.compare as C

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("previous run")  # an earlier compare output

    def boom(res):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(C, "widths_png", boom)
    with pytest.raises(RuntimeError):
        compare(net, sens, "bitfusion,bitserial", 4.0, out_dir=out, time_limit_s=10)
    assert [p.name for p in out.iterdir()] == ["compare.json"]  # the previous output is untouched
    assert (out / "compare.json").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]


def test_pareto_front_over_budgets(net, sens, tmp_path):
    out = tmp_path / "front"
    res = compare(net, sens, ["bitfusion"], budgets=[1.5, 3, 4, 5, 6], out_dir=out, time_limit_s=10)
    assert sorted(p.name for p in out.iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]
    bad, *pts = res.front
    assert not bad["feasible"] and "budget 1.5" in bad["why"]  # the pinned edge layers need more
    losses = [p["worst_group_loss"] for p in pts]
    assert losses == sorted(losses, reverse=True)  # more bits, less loss
    assert all(p["avg_weight_bits"] <= p["budget"] for p in pts)
    front = [p for p in pts if p["pareto"]]
    assert front and all(not (q["worst_group_loss"] < p["worst_group_loss"] and q["fps"] > p["fps"]) for p in front for q in pts)
    assert "| 4 |" in (out / "pareto.md").read_text()


def test_bad_target_is_one_line(net, sens):
    with pytest.raises(FqhwError) as e:
        compare(net, sens, "bitfusion,pynq-z3", 4.0)
    msg = str(e.value)
    assert "\n" not in msg and "pynq-z3" in msg and "bitserial" in msg and "zcu104" in msg
    with pytest.raises(FqhwError) as e:
        compare(net, sens, "bitfusion,bitserial", budgets=[3, 4])
    assert "\n" not in str(e.value) and "one target" in str(e.value)
    with pytest.raises(FqhwError):
        compare(net, sens, "pynq-z2", 4.0, objective="energy")  # an ASIC objective with no ASIC target


def test_cli_from_compile_outputs(net, sens, tmp_path, capsys):
    (tmp_path / "network.json").write_text(json.dumps(net.to_dict()))
    sens.save(tmp_path / "sensitivity.json")
    files = ["--network", str(tmp_path / "network.json"), "--sensitivity", str(tmp_path / "sensitivity.json")]
    out = tmp_path / "out"
    rc = cli.main(["compare", "--targets", "bitfusion,bitserial", "--budget", "4", "--objective", "energy", "--out", str(out), *files])
    assert rc == 0 and (out / "compare.md").exists()
    assert json.loads((out / "compare.json").read_text())["objectives"] == {"bitfusion": "energy", "bitserial": "energy"}
    assert capsys.readouterr().out.startswith(f"wrote {out}")

    rc = cli.main(["compare", "--targets", "bitfusion", "--budgets", "3,4", "--out", str(tmp_path / "front"), *files])
    assert rc == 0 and (tmp_path / "front" / "pareto.png").exists()

    for argv, words in [
        (["--targets", "bitfusion,nosuch", *files], "unknown target 'nosuch'"),
        (["--targets", "bitfusion", "--network", str(tmp_path / "network.json")], "go together"),
        (["--targets", "bitfusion", "--network", str(tmp_path / "nothere.json"), "--sensitivity", str(tmp_path / "x.json")], "does not exist"),
    ]:
        capsys.readouterr()
        rc = cli.main(["compare", *argv, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and "\n" not in err, err
        assert not (tmp_path / "bad").exists()
