"""What an hls4ml build is: the board and backend it targets, and the record of a build
(`Hls4mlBuild`: its folders, types, reuse factors), saved as JSON beside the project."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from fqhw.errors import FqhwError

BOARD = "pynq-z2"
PART = "xc7z020clg400-1"  # the board's part, as hls4ml's supported_boards.json names it
BACKEND = "VivadoAccelerator"
PROJECT_NAME = "myproject"
DEFAULT_CLOCK_NS = 10.0  # PYNQ-Z2 fabric clock of 100 MHz
IO_TYPES = ("io_stream", "io_parallel")
PATH_FIELDS = ("out_dir", "project_dir", "clean_model", "library")  # saved relative to out_dir


@dataclass
class Hls4mlBuild:
    """What `hls4ml_build` produced; plain data, so a saved build (`load`) runs its C
    simulation again without hls4ml (the compiled library is loaded with ctypes).

    precisions: allocation layer -> {"input", "weight", "bias", "accum", "result", "act"
      (convs: the ReLU output type)}, plus "input" -> {"result"}: the ap_fixed types given to
      hls4ml (and checked to be the ones it kept).
    accumulator_bits: layer -> width of its accumulator (the hardware cost of exactness).
    scale_exp: "input" and per layer {"input", "weight", "act"} exponents e (scale 2^e) read
      from the Quant nodes; the C simulation's values over these are the integer codes.
    hls_layers: "<layer>" / "<layer>.act" -> the hls4ml layer computing it (per allocation
      unit: a channel group "<layer>:g<k>" has its own), "<Concat node>.concat" -> the
      Concatenate joining a layer's channel groups.
    input_tap: the traced layer holding the input codes and the border to crop, or None.
    traced: hls4ml layer -> output shape, for every layer the C simulation traces.
    reuse_factors: layer -> {"requested" (from PE / SIMD), "used" (what hls4ml accepted)}.
    """

    out_dir: str
    project_dir: str  # the hls4ml project (VivadoAccelerator, pynq-z2)
    clean_model: str  # the channels-last QONNX model hls4ml read
    qonnx_path: str
    board: str
    part: str
    backend: str
    io_type: str
    clock_ns: float
    precisions: dict[str, dict[str, str]]
    accumulator_bits: dict[str, int]
    scale_exp: dict
    hls_layers: dict[str, str]
    input_tap: dict | None
    traced: dict[str, list[int]]
    n_outputs: int
    reuse_factors: dict[str, dict[str, int]]
    strategies: dict[str, str]
    convert_s: float
    write_s: float
    compile_s: float  # g++ build of the C simulation (0 when not compiled)
    library: str | None = None  # the compiled C simulation (.so), None when not compiled
    files: list[str] = field(default_factory=list)  # project files, relative to project_dir
    _model: object = field(default=None, repr=False, compare=False)  # hls4ml ModelGraph
    _lib: object = field(default=None, repr=False, compare=False)  # ctypes handle

    @property
    def layer_names(self) -> list[str]:
        return [n for n in self.precisions if n != "input"]

    def summary(self) -> dict:
        """The build in a few numbers (what a report shows)."""
        return {
            "backend": self.backend,
            "board": self.board,
            "part": self.part,
            "io_type": self.io_type,
            "clock_ns": self.clock_ns,
            "project_dir": self.project_dir,
            "precisions": {k: dict(v) for k, v in self.precisions.items()},
            "accumulator_bits": dict(self.accumulator_bits),
            "reuse_factors": {k: dict(v) for k, v in self.reuse_factors.items()},
            "convert_s": self.convert_s,
            "write_s": self.write_s,
            "compile_s": self.compile_s,
            "compiled": self.library is not None,
        }

    def to_dict(self) -> dict:
        """Plain data (JSON): every field but the in-memory handles."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if not f.name.startswith("_")}

    def save(self, path=None) -> Path:
        """Write the build as JSON (default out_dir/hls4ml_build.json), its paths relative to
        out_dir so that the folder can be moved."""
        root = Path(self.out_dir)
        path = Path(path) if path is not None else root / "hls4ml_build.json"
        d = self.to_dict()
        for k in PATH_FIELDS:
            if d[k] is not None:
                d[k] = os.path.relpath(d[k], root)
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, out_dir) -> "Hls4mlBuild":
        """Read a build saved by `save` (out_dir or the JSON file itself)."""
        p = Path(out_dir)
        path = p / "hls4ml_build.json" if p.is_dir() else p
        if not path.is_file():
            raise FqhwError(f"no hls4ml build at {out_dir} (hls4ml_build.json is missing); run the hls4ml step first")
        d = json.loads(path.read_text())
        root = path.parent.resolve()
        for k in PATH_FIELDS:
            if d.get(k) is not None:
                d[k] = str((root / d[k]).resolve())
        return cls(**d)

    @property
    def model(self):
        """The compiled hls4ml ModelGraph (None for a build read back with `load`)."""
        return self._model

