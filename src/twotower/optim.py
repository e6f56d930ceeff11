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


def _closure_loss(closure: Any) -> Any:
    """What ``torch.optim.Optimizer.step(closure)`` returns: the closure's loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
        loss = _closure_loss(closure)
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


class LazyAdam(torch.optim.Optimizer):
    """Adam, with Keras's arithmetic, whose step on a sparse gradient touches only the batch's rows (TensorFlow
    Addons' ``LazyAdam``; torch's ``SparseAdam`` is the same idea with torch's epsilon): the moments of rows not in
    the batch are not decayed, so a step costs O(batch). Dense gradients (MLP layers) take the ordinary update.

    With ``t`` the parameter's step count and ``g`` a row's gradient (a sparse gradient's duplicates summed first):
    ``m = b1 * m + (1 - b1) * g``, ``v = b2 * v + (1 - b2) * g ** 2``, ``row -= lr * sqrt(1 - b2 ** t) / (1 - b1 **
    t) * m / (sqrt(v) + eps)`` (Keras's form: epsilon added to the uncorrected root, default 1e-7).

    Args:
        params: the parameters.
        lr: the learning rate (Adam wants far smaller ones than Adagrad's 0.1: Keras's default is 0.001).
        betas: the moments' decay rates.
        eps: added to the root of the second moment.
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = KERAS_EPSILON,
    ) -> None:  # fmt: skip
        if not 0.0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= eps < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                grad = parameter.grad
                if grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                t = float(state["step"])
                rate = group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
                first, second = state["exp_avg"], state["exp_avg_sq"]
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    row_first = first[rows].mul_(beta1).add_(values, alpha=1 - beta1)
                    row_second = second[rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                    first[rows], second[rows] = row_first, row_second
                    parameter.index_add_(0, rows, row_first / row_second.sqrt().add_(group["eps"]), alpha=-rate)
                else:
                    first.mul_(beta1).add_(grad, alpha=1 - beta1)
                    second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    parameter.addcdiv_(first, second.sqrt().add_(group["eps"]), value=-rate)
        return loss


#: The optimizers a pipeline run may name (``optimizer = ...`` under ``[training]``, ``--optimizer``).
OPTIMIZERS = ("adagrad", "rowwise-adagrad", "adam")


def make_optimizer(
    name: str, parameters: Iterable[torch.nn.Parameter], learning_rate: float, sparse: bool
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) for ``parameters``.

    ``"adagrad"``: Keras's Adagrad (:func:`keras_adagrad`, or :func:`sparse_keras_adagrad` for ``sparse``
    gradients); ``"rowwise-adagrad"``: :class:`RowWiseAdagrad` on the 2-D tables (others take Keras's Adagrad);
    ``"adam"``: :class:`LazyAdam`.

    Raises:
        ValueError: an unknown ``name``.
    """
    parameters = list(parameters)
    if name == "adagrad":
        return sparse_keras_adagrad(parameters, learning_rate) if sparse else keras_adagrad(parameters, learning_rate)
    if name == "rowwise-adagrad":
        if any(parameter.ndim != 2 for parameter in parameters):
            raise ValueError("optimizer 'rowwise-adagrad' needs 2-D tables only; this model has other parameters")
        return RowWiseAdagrad(parameters, lr=learning_rate)
    if name == "adam":
        return LazyAdam(parameters, lr=learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
