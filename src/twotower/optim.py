"""Optimizers with the settings of TFRS's tutorials, dense and for embedding tables with sparse gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: Keras's Adagrad defaults (TFRS's optimizer): where the accumulators start, and the epsilon added to their root.
KERAS_INITIAL_ACCUMULATOR, KERAS_EPSILON = 0.1, 1e-7


def keras_adagrad(parameters: Iterable[torch.nn.Parameter], learning_rate: float = 0.1) -> torch.optim.Adagrad:
    """TFRS's optimizer: Adagrad with Keras's defaults (initial accumulator 0.1, epsilon 1e-7).

    The fused implementation (one kernel for every parameter, torch 2.4+) where this torch has it: it updates
    the tutorial's two embedding tables in about half the time of the per-tensor loop, with the same arithmetic
    up to float32 rounding.
    """
    parameters = list(parameters)
    try:
        return torch.optim.Adagrad(
            parameters,
            lr=learning_rate,
            fused=True,
            initial_accumulator_value=KERAS_INITIAL_ACCUMULATOR,
            eps=KERAS_EPSILON,
        )
    except (TypeError, RuntimeError):  # torch < 2.4 has no fused Adagrad, or not for these tensors' device
        return torch.optim.Adagrad(
            parameters, lr=learning_rate, initial_accumulator_value=KERAS_INITIAL_ACCUMULATOR, eps=KERAS_EPSILON
        )


class SparseAdagrad(torch.optim.Adagrad):
    """torch's Adagrad, whose step builds the sparse updates with torch's invariant checks explicitly off (its own
    tensors are valid by construction; left implicit, torch warns on every process's first sparse step)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        with torch.sparse.check_sparse_tensor_invariants(enable=False):  # type: ignore[no-untyped-call]
            return super().step(closure)


def sparse_keras_adagrad(parameters: Iterable[torch.nn.Parameter], learning_rate: float = 0.1) -> SparseAdagrad:
    """:func:`keras_adagrad` for embedding tables with sparse gradients (``nn.Embedding(..., sparse=True)``): a step
    touches only the rows in the batch, so it costs O(batch), not O(table).

    TensorFlow applies Adagrad to an embedding's ``IndexedSlices`` the same way: the gradient's duplicate rows are
    summed first, then for each touched row ``accumulator += g ** 2`` and ``row -= learning_rate * g /
    (sqrt(accumulator) + epsilon)``; untouched rows and their accumulators are left as they are. That is also what
    the dense update does to a row whose gradient is zero, so the two give the same weights (to float32 rounding);
    only the cost differs. Dense parameters (MLP layers) may be passed too: they take the per-tensor dense update.
    """
    return SparseAdagrad(list(parameters), lr=learning_rate, foreach=False,
                         initial_accumulator_value=KERAS_INITIAL_ACCUMULATOR, eps=KERAS_EPSILON)  # fmt: skip


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for embedding tables (FBGEMM's and TorchRec's ``EXACT_ROWWISE_ADAGRAD``): one accumulator
    per row, the mean of the row's squared gradient, instead of one per element: ``d`` times less optimizer
    memory for a ``[rows, d]`` table.

    For each row ``r`` with gradient ``g_r`` (duplicates of a sparse gradient summed first): ``a_r += mean(g_r **
    2)``, ``row_r -= lr * g_r / (sqrt(a_r) + eps)``. Rows without gradient are untouched. Takes sparse or dense
    gradients of 2-D parameters.

    Args:
        params: the tables (2-D).
        lr: the learning rate.
        initial_accumulator_value: each row's accumulator at the start (Keras's Adagrad default: 0.1).
        eps: added to the root of the accumulator (Keras's: 1e-7).
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float = 0.1,
        initial_accumulator_value: float = KERAS_INITIAL_ACCUMULATOR, eps: float = KERAS_EPSILON,
    ) -> None:  # fmt: skip
        if not 0.0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not 0.0 <= initial_accumulator_value < float("inf"):
            raise ValueError(f"initial_accumulator_value must be a finite number >= 0, got {initial_accumulator_value}")
        if not 0.0 <= eps < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "initial_accumulator_value": initial_accumulator_value, "eps": eps})
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.ndim != 2:
                    raise ValueError(
                        f"RowWiseAdagrad takes 2-D tables, got a parameter of shape {tuple(parameter.shape)}"
                    )
                self.state[parameter]["sum"] = torch.full(
                    (parameter.shape[0],), group["initial_accumulator_value"], dtype=parameter.dtype,
                    device=parameter.device,
                )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                grad = parameter.grad
                if grad is None:
                    continue
                accumulator = self.state[parameter]["sum"]
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows = torch.nonzero(grad.abs().sum(dim=1)).flatten()  # dense: the rows with gradient
                    values = grad[rows]
                accumulator.index_add_(0, rows, values.pow(2).mean(dim=1))
                scale = accumulator[rows].sqrt().add_(group["eps"])
                parameter.index_add_(0, rows, values / scale[:, None], alpha=-group["lr"])
        return loss
