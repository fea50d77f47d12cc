"""The authorization scenario: decisions per second, measured by ``benchmarks.authz.run(quick) -> dict``
(written with policy/authz), shown as a table. Whatever numbers the dict holds are shown, flattened to
``a.b.c`` names; nothing is invented when the module is missing."""

from __future__ import annotations

import importlib.util

from benchmarks.report import Column, Row, ScenarioResult


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flatten(v, name + ".")
        else:
            out.append((name, v))
    return out


def run_authz(*, quick: bool) -> ScenarioResult:
    res = ScenarioResult("authz", "authorization decisions (benchmarks.authz.run)", [Column("value", "value", _fmt)])
    if importlib.util.find_spec("benchmarks.authz") is None:
        res.rows.append(Row("policy.authz", "authz.run", note="not available: benchmarks/authz.py not built yet"))
        return res
    from benchmarks import authz
    try:
        result = authz.run(quick)
    except Exception as err:  # another helper's module: report its failure as a row, do not crash the run
        res.rows.append(Row("policy.authz", "authz.run", note=f"failed: {type(err).__name__}: {err}"))
        return res
    if not isinstance(result, dict):
        res.rows.append(Row("policy.authz", "authz.run", note=f"failed: run() returned {type(result).__name__}, not dict"))
        return res
    for name, value in flatten(result):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            res.notes.append(f"{name}: {value}")
            continue
        row = Row(name, "authz.run")
        row.add("value", value)
        res.rows.append(row)
    return res
