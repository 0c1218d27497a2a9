"""Prometheus text exposition of the daemon's counters (pure: values in, text out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    #: label tuple -> value; ``()`` for an unlabelled metric.
    samples: Mapping[tuple[tuple[str, str], ...], float] = field(default_factory=dict)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(metrics: Iterable[Metric]) -> str:
    out = []
    for m in metrics:
        out.append(f"# HELP {m.name} {m.help}")
        out.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in sorted(m.samples.items()):
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                out.append(f"{m.name}{{{text}}} {_number(value)}")
            else:
                out.append(f"{m.name} {_number(value)}")
    return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for ``spa status`` and tests."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values
