"""Render a ``python -m bench`` JSON table as Markdown (the README's performance table).

python -m bench.report bench-results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def format_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if row["unit"] == "share":
        return f"{value:.3f} share"
    number = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
    return f"{number} {row['unit']}"


def format_ratio(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.2f}× {row['reference']}" if row["ratio"] is not None else ""


def run_time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def markdown(table: dict[str, Any]) -> str:
    machine = table["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, CPU flags "
        f"{' '.join(machine['flags']) or 'none'}, TensorFlow {machine['tensorflow']}, "
        f"GPUs: {', '.join(machine['gpus']) or 'none'}. Images: {table['images']}. "
        f"Run time {run_time(table['seconds'])}.",
        "",
        "| group | measurement | value | ratio | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        cells = (row["group"], row["name"], format_value(row), format_ratio(row), row["note"])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "bench-results.json")
    print(markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
