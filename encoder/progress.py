"""``TqdmProgress``: the progress report of a run, a tqdm bar over images with the count of
failures beside it (the ``Runner``'s report stage for ``imgenc encode`` and ``fit-center``)."""

from __future__ import annotations

import sys

from encoder.images import LoadResult


class TqdmProgress:
    def __init__(self, total: int | None, enabled: bool, desc: str | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, unit="img", disable=not enabled, file=sys.stderr, smoothing=0.1, desc=desc
        )
        self.failed = 0

    def update(self, results: list[LoadResult]) -> None:
        self.bar.update(len(results))
        self.failed += sum(1 for r in results if not r.ok)
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()
