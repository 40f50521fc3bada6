"""bench/results/evidence.json is complete, and README's evidence table is rendered from it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "bench" / "evidence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evidence_json_has_every_field_the_claims_need():
    ev = json.loads((ROOT / "bench" / "results" / "evidence.json").read_text())
    assert set(ev["budgets"]) >= {"3", "4"}
    assert min(ev["test_counts"].values()) >= 1000  # every skin type resolved
    assert {"ptq", "qat"} <= set(ev["fidelity_spearman"])
    for b in ev["budgets"].values():
        ref = b["reference"]
        assert len(b["seeds"]) >= 3 and ref in b["methods"] and len(b["methods"]) == 9
        for m, r in b["methods"].items():
            lo, hi = r["worst_group_ci"]
            assert lo <= r["worst_group"] <= hi and {"avg_bits", "mean_group"} <= set(r)
            if m != ref:
                assert 0 <= r["p_vs_fqhw"] <= r["p_holm"] <= 1
                assert abs(r["diff_vs_fqhw"] - 100 * (b["methods"][ref]["worst_group"] - r["worst_group"])) < 1e-9
                assert r["diff_vs_fqhw_ci"][0] <= r["diff_vs_fqhw"] <= r["diff_vs_fqhw_ci"][1]


def test_readme_table_is_rendered_from_evidence_json():
    mod = _bench()
    ev = json.loads((ROOT / "bench" / "results" / "evidence.json").read_text())
    readme = (ROOT / "README.md").read_text()
    inside = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0]
    assert inside.strip() == mod.render(ev).strip()
