"""Small-sample statistics for comparing training runs: Student-t intervals of paired differences."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975, df}; past the table, 1.96 + 2.4 / df, which is within 0.002 of the exact value."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 samples), got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.959964 + 2.4 / df


@dataclass(frozen=True)
class Interval:
    mean: float
    stderr: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_interval(values: list[float]) -> Interval:
    """Mean of `values` with its standard error and the 95% Student-t interval (n - 1 degrees of freedom)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), float("nan"), n)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = t975(n - 1) * se
    return Interval(mean, se, mean - half, mean + half, n)
