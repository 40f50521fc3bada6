"""What report.md and report.html both print: the model rows, percentages, a group's
accuracy with its interval, the solver's verdict. Below report.py, html.py and plots.py, so
that none of them imports another for these."""
from __future__ import annotations

MODEL_ROWS = [("float", "Float"), ("uniform8", "Uniform 8-bit"), ("uniform4", "Uniform 4-bit"), ("compiled", "fqhw (compiled)")]


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def group_cell(m: dict, group: str) -> str:
    """A group's accuracy with its 95 % Wilson interval, in percent: "74.2 [71.4, 76.8]"."""
    ci = m.get("group_acc_ci95", {}).get(group)
    acc = pct(m["group_acc"].get(group))
    return acc if ci is None else f"{acc} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def solver_line(solver: dict) -> str:
    """The solver's verdict; when a time limit stopped a stage short of a proof, the best
    allocation found was used and how far it may be from the optimum is said."""
    line = f"Solver: {solver.get('status', '?')} in {solver.get('wall_time_s', float('nan')):.3f} s"
    if solver.get("status") == "OPTIMAL":
        return line + " (every stage proven optimal)"
    open_stages = [st for st in solver.get("stages", []) if st.get("status") != "OPTIMAL"]
    gaps = []
    for st in open_stages:
        obj, bound = st.get("objective"), st.get("bound")
        if obj is None or bound is None:
            gaps.append(f"{st['name']} (no solution or bound)")
        else:
            gaps.append(f"{st['name']} gap {100 * abs(obj - bound) / max(abs(obj), 1e-12):.2f} % (objective {obj:.6g}, bound {bound:.6g})")
    return (line + f"; the time limit ({solver.get('time_limit_s', '?')} s) stopped the search: the best allocation found is used. "
            f"Worst-group loss gap to its bound {100 * solver.get('gap', 0.0):.2f} %" + (f"; stages not proven: {'; '.join(gaps)}" if gaps else ""))
