"""Result rows, and the text tables and JSON made from them.

A row is one (proxy, client) pair in one scenario, with the raw samples of every metric over the
repetitions. Tables show each metric as ``median (min–max)`` and ratios of medians to the reference
row (nghttpx for tunnels, nginx for HTTP) driven by the same client in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from benchmarks.stats import Summary, ratio, summarize


@dataclass
class Row:
    target: str                 # what carried the bytes: direct, ours-relay, nghttpx, nginx, ...
    client: str                 # what drove it: python-h2 (1 MiB frames), node-http2 (16 KiB frames), wrk, ...
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str | None = None     # why there are no numbers (missing tool, not built yet, failed run)
    info: dict = field(default_factory=dict)  # facts that do not vary by repetition (frame size, ...)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(float(value))

    def summary(self, metric: str) -> Summary | None:
        vals = self.samples.get(metric)
        return summarize(vals) if vals else None

    def median(self, metric: str) -> float | None:
        s = self.summary(metric)
        return s.median if s else None

    def as_dict(self) -> dict:
        return {"target": self.target, "client": self.client, "note": self.note, "info": self.info,
                "summary": {m: summarize(v).as_dict() for m, v in self.samples.items() if v},
                "samples": self.samples}


@dataclass(frozen=True)
class Column:
    header: str
    metric: str
    fmt: Callable[[float], str] = lambda v: f"{v:.3g}"
    ratio_to: str | None = None  # a target name: show median / that target's median (same client)
    delta_to: str | None = None  # a target name: show median - that target's median (same client)


@dataclass
class ScenarioResult:
    name: str
    title: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Which rows are comparable for ratios: by default the same client.
    same_group: Callable[[Row, Row], bool] = lambda a, b: a.client == b.client

    def reference(self, row: Row, target: str) -> Row | None:
        for r in self.rows:
            if r.target == target and self.same_group(r, row) and r.samples:
                return r
        return None

    def as_dict(self) -> dict:
        return {"title": self.title, "notes": self.notes, "rows": [r.as_dict() for r in self.rows],
                "ratios": {f"{r.target}/{r.client}": {c.header: self.ratio(r, c) for c in self.columns if c.ratio_to}
                           for r in self.rows if r.samples},
                "deltas": {f"{r.target}/{r.client}": {c.header: self.delta(r, c) for c in self.columns if c.delta_to}
                           for r in self.rows if r.samples}}

    def delta(self, row: Row, col: Column) -> float | None:
        ref = self.reference(row, col.delta_to) if col.delta_to else None
        mine, theirs = row.median(col.metric), (ref.median(col.metric) if ref else None)
        return None if mine is None or theirs is None else mine - theirs

    def ratio(self, row: Row, col: Column) -> float | None:
        ref = self.reference(row, col.ratio_to) if col.ratio_to else None
        return ratio(row.median(col.metric), ref.median(col.metric) if ref else None)


def fmt_summary(s: Summary | None, fmt: Callable[[float], str]) -> str:
    if s is None:
        return "-"
    if s.n == 1 or s.low == s.high:
        return fmt(s.median)
    return f"{fmt(s.median)} ({fmt(s.low)}–{fmt(s.high)})"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}×"


def render(result: ScenarioResult) -> str:
    headers = ["proxy", "client", *(c.header for c in result.columns)]
    body: list[list[str]] = []
    for row in result.rows:
        cells = [row.target, row.client]
        if not row.samples:
            cells.append(row.note or "no result")
            body.append(cells)
            continue
        for col in result.columns:
            if col.ratio_to:
                cells.append(fmt_ratio(result.ratio(row, col)))
            elif col.delta_to:
                d = result.delta(row, col)
                cells.append("-" if d is None else ("+" if d >= 0 else "") + col.fmt(d))
            else:
                cells.append(fmt_summary(row.summary(col.metric), col.fmt))
        body.append(cells)
    return format_table(result.title, headers, body, result.notes + [
        f"{r.target}/{r.client}: {r.note}" for r in result.rows if r.samples and r.note])


def format_table(title: str, headers: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    """A plain-text table. A row shorter than the headers (a "not available" row) spans the rest."""
    widths = [len(h) for h in headers]
    for r in rows:
        # A short row's last cell spans; its leading cells still set their columns' widths.
        cells = r if len(r) == len(headers) else r[:-1]
        widths = [max(w, len(c)) for w, c in zip(widths, cells)] + widths[len(cells):]
    def line(cells: list[str]) -> str:
        if len(cells) < len(headers):
            head = [c.ljust(w) for c, w in zip(cells[:-1], widths)]
            return "  ".join([*head, cells[-1]]).rstrip()
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [f"== {title}", line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out += [f"  note: {n}" for n in notes]
    return "\n".join(out)


# Number formats shared by the scenarios.
def f0(v: float) -> str:
    return f"{v:,.0f}"


def f1(v: float) -> str:
    return f"{v:.1f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


def f3(v: float) -> str:
    return f"{v:.3f}"
