"""The FPGA boards FINN builds for (their parts and resource totals) and the default share
of each resource a build may use (FINN's DEFAULT_RES_LIMITS)."""
from __future__ import annotations

from dataclasses import dataclass


# finn.util.platforms.DEFAULT_RES_LIMITS (LUT, FF, BRAM_18K, URAM, DSP)
DEFAULT_UTILISATION = {"LUT": 0.7, "FF": 0.5, "BRAM_18K": 0.8, "URAM": 0.8, "DSP": 0.8}


# resources FINN's analytical estimates price (it has no FF estimate)
PRICED = ("LUT", "BRAM_18K", "URAM", "DSP")


@dataclass(frozen=True)
class Board:
    name: str
    part: str
    finn_board: str
    totals: dict  # per SLR for multi-SLR devices
    note: str = ""


def _totals(lut: int, bram18: int, uram: int, dsp: int) -> dict:
    return {"LUT": lut, "FF": 2 * lut, "BRAM_18K": bram18, "URAM": uram, "DSP": dsp}


# finn.util.platforms (Zynq7020_Platform, ZU3EG_Platform, ZU7EV_Platform,
# Alveo_NxU250_Platform) and finn.util.basic.part_map
BOARDS: dict[str, Board] = {
    "pynq-z1": Board("pynq-z1", "xc7z020clg400-1", "Pynq-Z1", _totals(53200, 280, 0, 220)),
    "pynq-z2": Board("pynq-z2", "xc7z020clg400-1", "Pynq-Z2", _totals(53200, 280, 0, 220)),
    "ultra96": Board("ultra96", "xczu3eg-sbva484-1-e", "Ultra96", _totals(71000, 412, 0, 360)),
    "zcu104": Board("zcu104", "xczu7ev-ffvc1156-2-e", "ZCU104", _totals(230000, 610, 92, 1728)),
    "u250": Board(
        "u250",
        "xcu250-figd2104-2L-e",
        "U250",
        _totals(375000, 1152, 320, 2880),
        note="one SLR of four (the dataflow pipeline is placed in one SLR)",
    ),
}
