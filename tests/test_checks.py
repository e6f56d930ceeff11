"""The shared argument checks: the finiteness check's fast path must never accept a NaN or an infinity."""

from __future__ import annotations

import math

import pytest
import torch

from twotower import _checks
from twotower._checks import require_finite


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    # The sum is inf although every value is finite: the slow path must decide, and accept.
    values = torch.full((4, 3), 3e38)
    assert math.isinf(float(values.sum()))
    require_finite(values, "values")


@pytest.mark.parametrize(
    ("bad", "count"),
    [([math.nan], 1), ([math.inf], 1), ([-math.inf], 1), ([math.inf, -math.inf], 2), ([math.nan, math.inf], 2)],
)
def test_non_finite_values_are_counted(bad: list[float], count: int) -> None:
    values = torch.ones(50, 4)
    values.view(-1)[torch.arange(len(bad)) * 17] = torch.tensor(bad)
    with pytest.raises(ValueError, match=rf"values contains {count} non-finite value"):
        require_finite(values, "values")


def test_large_tensors_are_checked_by_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_checks, "_FINITE_CHECK_ELEMENTS", 8)
    values = torch.ones(10, 3)
    require_finite(values, "values")
    values[9, 2] = math.nan  # in the last, partial slice
    values[0, 0] = math.inf
    with pytest.raises(ValueError, match="values contains 2 non-finite"):
        require_finite(values, "values")


def test_half_precision_sum_overflow_is_not_an_error() -> None:
    # float16 overflows at 65504: a sum of finite values reaches inf quickly.
    values = torch.full((100,), 60000.0, dtype=torch.float16)
    require_finite(values, "values")
    values[3] = math.nan
    with pytest.raises(ValueError, match="values contains 1 non-finite"):
        require_finite(values, "values")
