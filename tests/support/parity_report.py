"""The session's parity table: rows recorded by tests, gathered from pytest-xdist workers
and printed at the end of the run (the hooks in tests/conftest.py call these)."""

from __future__ import annotations

import json
from typing import Any

PARITY_ROWS: list[dict[str, Any]] = []
EXTRA_LINES: list[str] = []


def record_parity(
    component: str,
    config: str,
    value: float,
    bound: float,
    metric: str = "max|diff|",
    scale: float | None = None,
) -> float:
    """Add one row to the session table and print it (visible with `pytest -s`).

    `scale`: max |reference| of the compared tensor, so absolute diffs can be read in context.
    """
    row = dict(
        component=component,
        config=config,
        metric=metric,
        value=float(value),
        bound=float(bound),
        scale=scale,
    )
    PARITY_ROWS.append(row)
    print(f"[parity] {format_row(row)}")
    return float(value)


def format_row(r: dict) -> str:
    scale = f"{r['scale']:>8.2f}" if r.get("scale") is not None else f"{'':>8}"
    return f"{r['component']:<34} {r['config']:<26} {r['metric']:<22} {r['value']:>10.3e}  {r['bound']:>7.0e} {scale}"


def record_note(line: str) -> None:
    """A free-form line for the end-of-session summary (timings, RSS, KL stats)."""
    EXTRA_LINES.append(line)
    print(f"[parity] {line}")


def worker_payload() -> str:
    """This worker's rows and notes, for the controller."""
    return json.dumps({"rows": PARITY_ROWS, "lines": EXTRA_LINES})


def add_worker_payload(payload: str) -> None:
    data = json.loads(payload or "{}")
    PARITY_ROWS.extend(data.get("rows", []))
    EXTRA_LINES.extend(data.get("lines", []))


def write_summary(terminalreporter) -> None:
    if not PARITY_ROWS and not EXTRA_LINES:
        return
    tr = terminalreporter
    tr.section("PyTorch parity (f32 unless noted)")
    if PARITY_ROWS:
        tr.write_line(
            f"{'component':<34} {'config':<26} {'metric':<22} {'value':>10}  {'bound':>7} max|ref|"
        )
        for r in PARITY_ROWS:
            tr.write_line(format_row(r))
    for line in EXTRA_LINES:
        tr.write_line(line)
