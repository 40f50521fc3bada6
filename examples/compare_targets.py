"""Compare FPGA and ASIC targets for the default CNN at 4 bits per weight, from Python.

    python examples/compare_targets.py [COMPILE_OUT_DIR]

With a compile output folder, reads its network.json and sensitivity.json (seconds);
without, uses the default flow's cached float model and its group importance. Writes
fqhw-compare/ (compare.md, compare.json, widths.png) and prints each target's figures.
"""
import sys
from pathlib import Path

from fqhw.compare import compare, load_inputs

src = Path(sys.argv[1]) if len(sys.argv) > 1 else None
net, sens, source = load_inputs(src / "network.json" if src else None, src / "sensitivity.json" if src else None)
res = compare(net, sens, ["pynq-z2", "zcu104", "bitfusion", "bitserial"], budget=4, out_dir="fqhw-compare", source=source)
for t in res.targets:
    m = res.own[t]
    energy = f", {m['energy_uJ']:.2f} uJ/image" if m["energy_uJ"] is not None else ""
    print(f"{t:>10}: worst-group loss {m['worst_group_loss']:.4f}, {m['fps']:.0f} images/s{energy}; "
          f"best on its own target among the others: {res.own_best[t]}")
print(f"cross table: {Path(res.out_dir) / 'compare.md'}")
