"""``/metrics`` across replicas: each replica's Prometheus text with a ``replica`` label on every sample, its
families merged (one ``# TYPE`` line each), plus the front door's own numbers."""

from __future__ import annotations

import re
from collections.abc import Mapping

_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def merge_metrics(texts: Mapping[str, str], own: Mapping[str, float] | None = None) -> str:
    """``texts``: replica name -> its ``/metrics`` text; ``own``: the front door's numbers (name -> value,
    counters end in ``_total``), exported as ``avatar_cluster_<name>``. Lines that are not samples are dropped."""
    kinds: dict[str, str] = {}
    samples: dict[str, list[str]] = {}
    for name, value in sorted((own or {}).items()):
        family = f"avatar_cluster_{name}"
        kinds[family] = "counter" if name.endswith("_total") else "gauge"
        samples[family] = [f"{family} {float(value)!r}"]
    for replica, text in texts.items():
        label = f'replica="{_label(replica)}"'
        family = ""
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) == 4:
                    family = parts[2]
                    kinds.setdefault(family, parts[3])
                    samples.setdefault(family, [])
                continue
            match = _SAMPLE.fullmatch(line.strip())
            if match is None or line.startswith("#"):
                continue
            name, labels = match["name"], match["labels"]
            # samples follow their family's TYPE line (histogram _bucket/_sum/_count included)
            owner = family if family and name.startswith(family) else name
            kinds.setdefault(owner, "untyped")
            merged = f"{label},{labels}" if labels else label
            samples.setdefault(owner, []).append(f"{name}{{{merged}}} {match['value']}")
    lines: list[str] = []
    for family, kind in kinds.items():
        lines.append(f"# TYPE {family} {kind}")
        lines += samples[family]
    return "\n".join(lines) + "\n"
