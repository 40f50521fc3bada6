"""The no-build backend of ASIC targets: priced by their cost models (fqhw.hwmodels.asic)."""
