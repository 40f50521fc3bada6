"""What each cached step of the compile flow (fqhw.flow) reads of the CompileConfig, and its
cache key built from that declaration.

A step's key holds the CompileConfig fields it declares, each under its name in the key
(the names the keys had before they were declared, so that the default compile keeps its
keys), the entries the flow passes in (earlier steps' keys, the step's own constants) and
constants of the key itself. tests/test_stepkeys.py reads each step's code and fails when a
step reads a field its declaration leaves out, so a new setting cannot be forgotten by a key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fqhw.config import BIT_RANGE
from fqhw.errors import FqhwError
from fqhw.stepcache import file_digest

# Fields no step's output depends on: what is printed and where things are written.
NOT_KEYED = {
    "progress": "progress bars and step lines on stderr",
    "verbose": "more lines on stderr",
    "cache_dir": "where the cache entries are stored",
    "out_dir": "where the output folder is written",
}


@dataclass(frozen=True)
class StepKey:
    """The cache key of one step, from the CompileConfig fields it declares it reads."""

    fields: Mapping[str, str] = field(default_factory=dict)  # name in the key -> CompileConfig field
    given: tuple[str, ...] = ()  # entries the flow passes in: earlier steps' keys, the step's constants
    covered: tuple[str, ...] = ()  # fields read that the given entries already hold (the float key: the model)
    uncached: Mapping[str, str] = field(default_factory=dict)  # field -> why it changes nothing stored
    omit: Mapping[str, Callable[[Any], bool]] = field(default_factory=dict)  # key name -> the value leaves the entry out
    convert: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # key name -> how the value is written
    fixed: Mapping[str, Any] = field(default_factory=dict)  # constants of the key
    nested: Mapping[str, "StepKey"] = field(default_factory=dict)  # sub-keys of the config (the QAT settings)
    steps: tuple[str, ...] = ()  # the functions of fqhw.flow that compute the step (read by the test)

    def reads(self) -> set[str]:
        """Every CompileConfig field the step may read."""
        out = set(self.fields.values()) | set(self.covered) | set(self.uncached)
        for sub in self.nested.values():
            out |= sub.reads()
        return out

    def key(self, cfg, **given) -> dict:
        unknown = set(given) - set(self.given)
        if unknown:
            raise FqhwError(f"cache key entries {sorted(unknown)} are not declared by the step")
        out = dict(given)
        for name, f in self.fields.items():
            v = getattr(cfg, f)
            if name in self.omit and self.omit[name](v):
                continue
            out[name] = self.convert[name](v) if name in self.convert else v
        for name, sub in self.nested.items():
            out[name] = sub.key(cfg)
        out.update(self.fixed)
        return out


def _grid(grid) -> list:
    return [list(map(float, c)) for c in grid]


def _checkpoint_sha(path) -> str:
    return file_digest(Path(path))


# the QAT settings, as every QAT'd model's key holds them (FINN's scheme and no grid: keys as before)
QAT = StepKey(
    fields={"epochs": "qat_epochs", "lr": "qat_lr", "fairness_lambda": "fairness_lambda", "seed": "seed", "scheme": "backend",
            "grid": "qat_grid"},
    omit={"scheme": lambda v: v == "finn", "grid": lambda v: not v},
    convert={"grid": _grid},
)

# the allocator's settings, as allocate and fit hold them
_SOLVE = {"target": "target", "budget": "budget", "edge_bits": "edge_bits", "min_fps": "min_fps",
          "time_limit_s": "solver_time_limit_s", "seed": "seed"}

KEYS: dict[str, StepKey] = {
    # the trained weights (stored by fqhw.models.train.cached_float_model); `data` and `model`
    # are built by the flow from the fields in `covered`
    "float_model": StepKey(
        fields={"epochs": "float_epochs", "lr": "float_lr", "seed": "seed", "checkpoint": "checkpoint"},
        given=("data", "model"),
        covered=("data", "data_spec", "model", "channels", "model_kwargs"),
        uncached={"channel_groups": "the units the allocator sees, split from the model on every run (importance's key holds it)"},
        omit={"checkpoint": lambda v: v is None},
        convert={"checkpoint": _checkpoint_sha},
        fixed={"version": 1},
        steps=("step_float_model", "_float_key"),
    ),
    "importance": StepKey(
        fields={"samples": "importance_samples", "seed": "seed", "channel_groups": "channel_groups"},
        given=("float",),
        omit={"channel_groups": lambda v: v <= 1},
        fixed={"bits": BIT_RANGE, "method": "fisher"},
        steps=("step_importance",),
    ),
    "allocate": StepKey(fields=_SOLVE, given=("importance", "net"), steps=("step_allocate",)),
    "fit": StepKey(
        fields={**_SOLVE, "backend": "backend"},
        given=("allocation", "float", "importance", "rounds", "margin"),
        covered=("model",),
        omit={"backend": lambda v: v == "finn"},
        steps=("step_fit",),
    ),
    "baq": StepKey(
        fields={"budget": "budget", "target": "target", "epochs": "baq_epochs", "bitrate_lambda": "baq_bitrate_lambda",
                "edge_bits": "edge_bits", "min_fps": "min_fps", "time_limit_s": "solver_time_limit_s"},
        given=("float", "allocation"),
        nested={"qat": QAT},
        steps=("step_baq",),
    ),
    "uniform": StepKey(given=("float", "bits"), covered=("model",), nested={"qat": QAT}, steps=("quantize_finetune",)),
    "quantize": StepKey(given=("float", "allocation"), covered=("model",), nested={"qat": QAT}, steps=("step_quantize",)),
    "export": StepKey(given=("quantize", "input_shape"), covered=("model",), steps=("step_export",)),
    # stored under the backend's name (the cache key holds the step's name: --backend is in
    # it); `layout`: the backend's version of its stored folder (Backend.cache_layout)
    "build": StepKey(fields={"target": "target"}, given=("qonnx", "allocation", "layout"), covered=("model", "backend"),
                     steps=("step_build",)),
}


# A `fqhw sidebyside` record (fqhw.sidebyside.run_inputs): one (seed, method), and its
# tuning stages under the same key. `method`, `baq_epochs` and `bitrate_lambda` are the
# sweep's (given); the float key holds the data, the model and the seed. A uniform
# allocation reads neither the budget nor the target, so one entry serves every budget.
# The solver's time limit and channel groups are left out at their defaults, where the
# records had no such entries.
SIDEBYSIDE = StepKey(
    fields={"edge_bits": "edge_bits", "budget": "budget", "target": "target", "importance_samples": "importance_samples",
            "min_fps": "min_fps", "time_limit_s": "solver_time_limit_s", "channel_groups": "channel_groups"},
    given=("float", "method", "baq_epochs", "bitrate_lambda"),
    covered=("model", "seed", "data", "data_spec", "channels", "model_kwargs", "checkpoint"),
    omit={"time_limit_s": lambda v: v == 30.0, "channel_groups": lambda v: v <= 1},
    nested={"qat": QAT},
    fixed={"version": 2},  # 2: the record keeps every test prediction
    steps=("run_method", "method_start", "qat_candidate", "tuned_record", "_allocation", "_record"),
)
SIDEBYSIDE_UNIFORM = StepKey(
    fields={"edge_bits": "edge_bits", "channel_groups": "channel_groups"}, given=("float", "method"),
    omit={"channel_groups": lambda v: v <= 1}, nested={"qat": QAT}, fixed={"version": 2},
)


def qat_inputs(cfg) -> dict:
    """The QAT settings as a cache key holds them."""
    return QAT.key(cfg)
