"""``python -m bench``: the speed, quality and cost figures of the README and
docs/performance.md, in one run on the same photos."""
