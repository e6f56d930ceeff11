"""What every twotower metric shares: a name, ``{name: value}`` results, weighted means in float64."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchmetrics import Metric

from twotower._checks import require_finite, require_tensor


class NamedMetric(Metric):
    """A torchmetrics ``Metric`` with a name, reporting ``{name: value}`` pairs.

    (Not ``torchmetrics.retrieval.RetrievalMetric``, which groups per-query scores by an index tensor; these
    metrics are updated by :class:`twotower.tasks.Retrieval` with losses, logits or embeddings.)
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name

    def value(self) -> torch.Tensor:
        """``compute()``, without torchmetrics' warning when there was no update (the value is then 0)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            value: torch.Tensor = self.compute()
        return value

    def results(self) -> dict[str, float]:
        """Return the metric's current values as ``{name: float}``."""
        return {self.name: float(self.value())}


class WeightedMean(NamedMetric):
    """A weighted mean accumulated in float64: ``sum(w * x) / sum(w)``, 0 while ``sum(w) == 0`` (as Keras's
    ``divide_no_nan`` makes it)."""

    weighted_sum: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.add_state("weighted_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, values: torch.Tensor, sample_weight: torch.Tensor | None) -> None:
        values = values.detach().to(torch.float64).reshape(-1)
        if sample_weight is None:
            weights = torch.ones_like(values)
        else:
            weights = sample_weight.detach().to(device=values.device, dtype=torch.float64).reshape(-1)
            if weights.shape != values.shape:
                raise ValueError(f"sample_weight must have shape {tuple(values.shape)}, got {tuple(weights.shape)}")
        self.weighted_sum += (values * weights).sum()
        self.total_weight += weights.sum()

    def compute(self) -> torch.Tensor:
        if float(self.total_weight) == 0.0:
            return torch.zeros((), dtype=torch.float64, device=self.weighted_sum.device)
        return self.weighted_sum / self.total_weight


class WeightedMeans(NamedMetric):
    """Several weighted means kept side by side: ``sums[m] / total_weight``, 0 while ``total_weight == 0``."""

    sums: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, name: str, size: int, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.add_state("sums", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate_rows(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``values`` ``[nq, size]`` with per-row ``weights`` ``[nq]`` (float64, CPU)."""
        self.sums += (values * weights[:, None]).sum(dim=0).to(self.sums.device)
        self.total_weight += weights.sum().to(self.total_weight.device)

    def compute(self) -> torch.Tensor:
        """``[size]`` weighted means (0 before any update)."""
        if float(self.total_weight) == 0.0:
            return torch.zeros_like(self.sums)
        return self.sums / self.total_weight

    def _named(self, names: list[str]) -> dict[str, float]:
        return dict(zip(names, self.value().reshape(-1).tolist(), strict=True))


def check_sample_weight(sample_weight: Any, num_rows: int) -> torch.Tensor:
    """``sample_weight`` as a finite, non-negative ``[num_rows]`` tensor (``[num_rows, 1]`` is squeezed)."""
    weights = require_tensor(sample_weight, "sample_weight")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"sample_weight must hold real numbers, got dtype {weights.dtype}")
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.shape != (num_rows,):
        raise ValueError(f"sample_weight must have shape ({num_rows},), got {tuple(weights.shape)}")
    require_finite(weights.to(torch.float64), "sample_weight")
    if bool((weights < 0).any()):
        raise ValueError("sample_weight must be non-negative")
    return weights


def weights_or_ones(sample_weight: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """Checked weights as float64 on the CPU, or ones."""
    if sample_weight is None:
        return torch.ones(num_rows, dtype=torch.float64)
    return sample_weight.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
