"""Unit naming: an allocation unit is a layer ("features.1.conv") or one output-channel
group of a layer ("features.1.conv:g0", `fqhw.network.split_channel_groups`). Trace keys
follow the unit ("<unit>.act", "<unit>.acc"). Every part that reads units or traces (quant,
the backends, the simulator) takes these names from here; nothing here imports torch or
brevitas."""
from __future__ import annotations

import re

import numpy as np

from fqhw.errors import FqhwError

_UNIT = re.compile(r"^(?P<layer>.+):g(?P<k>\d+)$")


def parse_unit(name: str) -> tuple[str, int | None]:
    """("<layer>", k) for a channel-group unit "<layer>:g<k>", (name, None) for a whole layer."""
    m = _UNIT.match(name)
    return (m.group("layer"), int(m.group("k"))) if m else (name, None)


def group_key(key: str) -> tuple[str, int | None, str]:
    """Split a trace key "<layer>:g<k>.<what>" into (layer, k, what); k None for an
    ungrouped key ("features.0.conv.act" -> ("features.0.conv", None, "act"))."""
    m = re.match(r"^(?P<layer>.+):g(?P<k>\d+)\.(?P<what>[^.]+)$", key)
    if m:
        return m.group("layer"), int(m.group("k")), m.group("what")
    return key, None, ""


def merge_group_keys(trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A trace with per-group keys ("<layer>:g<k>.act", "<layer>:g<k>.acc") replaced by the
    layer's key ("<layer>.act"), the groups' values concatenated along the channel axis
    (axis 1: NCHW, or (N, C) for the head) in group order. Keys without groups are kept, in
    order; a trace without groups comes back unchanged. Refuses a layer whose group indices
    are not 0..G-1."""
    out: dict[str, np.ndarray] = {}
    pending: dict[str, dict[int, np.ndarray]] = {}
    order: list[str] = []
    for key, value in trace.items():
        layer, k, what = group_key(key)
        if k is None:
            order.append(key)
            out[key] = value
            continue
        merged = f"{layer}.{what}"
        if merged not in pending:
            pending[merged] = {}
            order.append(merged)
        pending[merged][k] = value
    for merged, parts in pending.items():
        if sorted(parts) != list(range(len(parts))):
            raise FqhwError(f"{merged}: channel groups {sorted(parts)} are not 0..{len(parts) - 1}")
        out[merged] = np.concatenate([parts[k] for k in range(len(parts))], axis=1)
    return {k: out[k] for k in order}
