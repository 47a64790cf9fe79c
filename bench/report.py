"""The benchmark's results: metrics with targets, percentiles, the printed table and the JSON.

Every measurement ends up as a :class:`Metric` (a value, its unit and, when the issue sets
one, a :class:`Target` that decides PASS or MISS); the raw numbers behind it go into
``details`` of the JSON file next to a description of the machine it ran on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GOALS", "Goal", "Metric", "Report", "Target", "busy_percent", "cpu_jiffies",
    "machine_info", "percentile",
]


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100) of ``values`` by linear interpolation; NaN if empty."""
    if not values:
        return float("nan")
    data = sorted(values)
    rank = (len(data) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``value <= bound`` (``"<="``) or ``value >= bound`` (``">="``)."""

    op: str
    bound: float

    def met_by(self, value: float) -> bool:
        if value != value:  # NaN: nothing was measured
            return False
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def text(self, unit: str) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        return f"{sign} {self.bound:g} {unit}".rstrip()


@dataclass
class Metric:
    """One row of the table: ``key`` is stable (JSON), ``label`` is for people."""

    key: str
    label: str
    value: float
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.met_by(self.value) else "MISS"

    def value_text(self) -> str:
        return _value_text(self.value, self.unit)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "value": None if self.value != self.value else self.value,
            "unit": self.unit,
            "target": None if self.target is None else asdict(self.target),
            "status": self.status or None,
            "note": self.note,
        }


# Issue 12's goals, by number (goal 0, the peer in the nested VM, is `make bench-vm`'s).
GOALS: dict[int, str] = {
    1: "one wake-up per flip",
    2: "flip overhead close to the floor",
    3: "DBUF_CREATE close to bare mapping",
    4: "copies on all cores",
    5: "capacity",
    6: "memory",
    7: "fairness",
}


@dataclass
class Goal:
    """One row of the goal table: what one run measured for goal ``number`` of issue 12.

    A goal may have several rows (e.g. zero-copy and copy mode). ``value`` is the ratio or
    figure the goal is stated in; ``target`` decides PASS/MISS (``None``: a figure the goal
    asks to print, not to judge). Add one with :meth:`Report.add_goal` from the part that
    measured it, e.g. ``report.add_goal(Goal(1, "CPU per zero-copy flip / one trio
    wake-up", ratio, "×", Target("<=", 1.2), note="459 µs / 301 µs"))``.
    """

    number: int
    label: str
    value: float
    unit: str = ""
    target: Target | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.number not in GOALS:
            raise ValueError(f"issue 12 has no goal {self.number}")

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.met_by(self.value) else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "goal": GOALS[self.number],
            "label": self.label,
            "value": None if self.value != self.value else self.value,
            "unit": self.unit,
            "target": None if self.target is None else asdict(self.target),
            "status": self.status or None,
            "note": self.note,
        }


@dataclass
class Report:
    """Everything one run measured."""

    mode: str
    machine_before: dict[str, Any] = field(default_factory=lambda: machine_info())
    metrics: list[Metric] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    busy_before: float = float("nan")  # % of all CPUs busy just before the run (others' work)

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def add_goal(self, goal: Goal) -> Goal:
        self.goals.append(goal)
        return goal

    def table(self) -> str:
        rows = [
            (m.label, _value_text(m.value, m.unit), m.target.text(m.unit) if m.target else "-",
             m.status)
            for m in self.metrics
        ]
        lines = _columns(("metric", "value", "target", "result"), rows)
        notes = [f"  {m.label.strip(' =')}: {m.note}" for m in self.metrics if m.note]
        if notes:
            lines += ["", "notes:", *notes]
        return "\n".join(lines)

    def goal_table(self) -> str:
        """Every goal of issue 12 in order, its rows from this run ("not measured" if none)."""
        rows = []
        for number, title in GOALS.items():
            mine = [g for g in self.goals if g.number == number]
            if not mine:
                rows.append((f"{number}", title, "not measured", "-", ""))
            for i, g in enumerate(mine):
                rows.append((f"{number}" if i == 0 else "", f"{title}: {g.label}" if i == 0
                             else f"  {g.label}", _value_text(g.value, g.unit),
                             g.target.text(g.unit) if g.target else "-", g.status))
        lines = _columns(("goal", "issue 12", "value", "target", "result"), rows)
        notes = [f"  {g.number} {g.label}: {g.note}" for g in self.goals if g.note]
        if notes:
            lines += ["", "goal notes:", *notes]
        return "\n".join(lines)

    def summary(self) -> str:
        judged = [m for m in self.metrics if m.target is not None]
        missed = [m.key for m in judged if m.status == "MISS"]
        text = f"{len(judged) - len(missed)}/{len(judged)} targets met"
        if missed:
            text += "; missed: " + ", ".join(missed)
        goals = [g for g in self.goals if g.target is not None]
        if goals:
            missed_goals = [f"{g.number} ({g.label})" for g in goals if g.status == "MISS"]
            text += f"; issue 12 goal rows: {len(goals) - len(missed_goals)}/{len(goals)} PASS"
            if missed_goals:
                text += "; missed: " + ", ".join(missed_goals)
        if self.errors:
            text += f"; {len(self.errors)} part(s) failed to run"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seconds": round(self.seconds, 1),
            "machine": self.machine_before,
            "loadavg_after": os.getloadavg(),
            "machine_busy_percent_before": self.busy_before,
            "metrics": [m.as_json() for m in self.metrics],
            "goals": [g.as_json() for g in self.goals] + [
                {"number": n, "goal": t, "status": "not measured"}
                for n, t in GOALS.items() if not any(g.number == n for g in self.goals)
            ],
            "details": self.details,
            "errors": self.errors,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2, default=_jsonable) + "\n")


def _value_text(v: float, unit: str) -> str:
    if v != v:
        return "n/a"
    if v == int(v) and abs(v) < 1e9:
        text = f"{int(v)}"
    elif abs(v) >= 100:
        text = f"{v:.0f}"
    elif abs(v) >= 10:
        text = f"{v:.1f}"
    else:
        text = f"{v:.3g}"
    return f"{text} {unit}".rstrip()


def _columns(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _jsonable(value: object) -> object:
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def busy_percent(start: tuple[float, float], end: tuple[float, float]) -> float:
    """How busy all CPUs together were between two :func:`cpu_jiffies` readings (0–100)."""
    total = end[1] - start[1]
    return 100.0 * (end[0] - start[0]) / total if total > 0 else float("nan")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and library versions, and the commit measured."""
    import numpy
    import trio

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    memory = None
    with contextlib.suppress(ValueError, OSError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "numpy": numpy.__version__,
        "trio": trio.__version__,
        "commit": _git_commit(),
        "loadavg": os.getloadavg(),
    }
