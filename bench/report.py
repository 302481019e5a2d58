"""Render a ``python -m bench`` JSON table as the Markdown table in the README.

python -m bench.report bench/results-clothing-1k.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _value(row: dict) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if row["unit"] in ("share",):
        return f"{value:.3f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def markdown(table: dict) -> str:
    m = table["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags {' '.join(m['flags']) or 'none'}, "
        f"TensorFlow {m['tensorflow']}, GPUs: {', '.join(m['gpus']) or 'none'}. "
        f"Images: {table['images']}. Run time {table['seconds'] / 60:.0f} min.",
        "",
        "| group | measurement | value | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in table["rows"]:
        ratio = f"{row['ratio']:.2f}× {row['of']}" if row["ratio"] is not None else ""
        target = row["target"]
        if row["met"] is not None:
            target = f"{target} {'met' if row['met'] else '**missed**'}"
        lines.append(
            f"| {row['group']} | {row['name']} | {_value(row)} {row['unit']} | {ratio} | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    print(markdown(json.loads(Path(args[0] if args else "bench-results.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
