"""Compile the default CNN for the PYNQ-Z2 at 4 bits per weight, from Python.

    python examples/compile_pynq_z2.py [OUT_DIR]

The same flow as `fqhw compile --target pynq-z2 --budget 4`; prints the accuracy of each
model per group and where the output went.
"""
import sys

import fqhw
from fqhw.fairness.metrics import summary_line

out = sys.argv[1] if len(sys.argv) > 1 else "fqhw-out"
result = fqhw.compile(target="pynq-z2", budget=4, out_dir=out)
for name, metrics in result.report["accuracy"].items():
    print(f"{name:>9}: {summary_line(metrics)}")
alloc = result.report["allocation"]
print(f"average weight width {alloc['avg_weight_bits']:.2f} bits; bit-exact: {result.report['bit_exact']['ok']}")
print(f"report: {result.out_dir / 'report.md'}")
