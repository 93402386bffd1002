"""The Prometheus text format (0.0.4) of a set of metric values.

Theory of operation: metric names come from filters and may hold anything,
so names and label keys are sanitized (anything outside the allowed set
becomes '_') and label values escaped.  A family is one name with one type:
series are grouped by their sanitized base name, and a series whose base
name already belongs to a family of another type gets its kind appended
(`name_gauge`), so the output stays valid whatever the filters defined.  This
module only formats: the registry reads the values and hands them in.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, NamedTuple

from .handles import COUNTER, GAUGE, KIND_NAMES

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class Sample(NamedTuple):
    """One series: its stored name (labels from byte labels_at on, 0: none), kind, bounds and value.

    value: an int for a counter or gauge; a histogram's snapshot()
    (per-bucket counts incl. +Inf, count, sum).
    """

    name: bytes
    labels_at: int
    kind: int
    bounds: tuple
    value: object


def sanitize_name(name: str) -> str:
    """A Prometheus metric name: [a-zA-Z_:][a-zA-Z0-9_:]*, anything else becomes '_'."""
    name = _NAME_BAD.sub("_", name)
    return name if name and not name[0].isdigit() else "_" + name


def label_block(labels) -> str:
    """'{k="v",...}' sorted by key, keys sanitized and values escaped; '' for no labels."""
    if not labels:
        return ""
    items = sorted((labels.items() if isinstance(labels, dict) else labels))
    parts = []
    for key, value in items:
        key = _LABEL_BAD.sub("_", str(key))
        if not key or key[0].isdigit():
            key = "_" + key
        value = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{key}="{value}"')
    return "{" + ",".join(parts) + "}"


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


def _lines(base: str, labels: str, s: Sample) -> list[str]:
    if s.kind in (COUNTER, GAUGE):
        return [f"{base}{labels} {s.value}"]
    buckets, count, total = s.value
    inner = labels[1:-1] + "," if labels else ""
    running, lines = 0, []
    for bound, n in zip(s.bounds + (math.inf,), buckets):
        running += n
        lines.append(f'{base}_bucket{{{inner}le="{fmt(bound)}"}} {running}')
    lines.append(f"{base}_sum{labels} {fmt(total)}")
    lines.append(f"{base}_count{labels} {count}")
    return lines


def render(samples: Iterable[Sample]) -> str:
    """# TYPE lines and samples, families in order of first appearance; histograms as _bucket/_sum/_count."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for s in samples:
        cut = s.labels_at or len(s.name)
        base = sanitize_name(s.name[:cut].decode("utf-8", "replace"))
        labels = s.name[cut:].decode("utf-8", "replace")
        group = groups.get(base)
        if group is not None and group[0] != s.kind:
            base = f"{base}_{KIND_NAMES[s.kind]}"  # one name, one type
            group = groups.get(base)
        if group is None:
            group = groups[base] = (s.kind, [])
        group[1].extend(_lines(base, labels, s))
    out = []
    for base, (kind, lines) in groups.items():
        out.append(f"# TYPE {base} {KIND_NAMES[kind]}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""
