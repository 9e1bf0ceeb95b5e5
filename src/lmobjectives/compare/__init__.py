"""Equal-budget comparison of pre-training objectives (``lmobj compare``): the harness trains
or reuses one run per objective and measures it; ``lmobjectives.report.comparison`` writes the
report from the files it leaves."""

from __future__ import annotations

from lmobjectives.compare.harness import DEFAULT_OBJECTIVES, DEFAULT_OUT, CompareResult, compare

__all__ = ["DEFAULT_OBJECTIVES", "DEFAULT_OUT", "CompareResult", "compare"]
