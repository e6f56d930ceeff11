"""Optimizers for embedding tables: steps checked against the update rules written out in numpy (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from twotower.optim import LazyAdam, RowWiseAdagrad, keras_adagrad, make_optimizer, sparse_keras_adagrad

ROWS, DIM = 7, 3
# Two batches of rows, with duplicates (row 1 three times): TF sums a row's duplicates before the update.
BATCHES = [np.array([1, 4, 1, 2, 1]), np.array([4, 6, 4])]


def _step(table: nn.Embedding, optimizer: torch.optim.Optimizer, rows: np.ndarray, weights: np.ndarray) -> None:
    """One step of the loss ``sum_k <table[rows[k]], weights[k]>``: row r's gradient is the sum of its weights."""
    optimizer.zero_grad()
    loss = (table(torch.as_tensor(rows)) * torch.as_tensor(weights, dtype=torch.float32)).sum()
    loss.backward()
    optimizer.step()


def _gradient(rows: np.ndarray, weights: np.ndarray) -> dict[int, np.ndarray]:
    summed: dict[int, np.ndarray] = {}
    for row, weight in zip(rows.tolist(), weights, strict=True):
        summed[row] = summed.get(row, np.zeros(DIM)) + weight
    return summed


def _weights(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_keras_adagrad_steps_as_tensorflows_sparse_adagrad(sparse: bool) -> None:
    """TF's sparse Adagrad (Keras defaults: accumulator 0.1, epsilon 1e-7) by hand: duplicates summed, then on
    each touched row ``a += g**2; v -= lr g / (sqrt(a) + eps)``; other rows and accumulators untouched. The dense
    gradients of the same table give the same steps."""
    torch.manual_seed(0)
    table = nn.Embedding(ROWS, DIM, sparse=sparse)
    values = table.weight.detach().double().numpy().copy()
    accumulators = np.full((ROWS, DIM), 0.1)
    optimizer = sparse_keras_adagrad(table.parameters(), learning_rate=0.3)
    for number, rows in enumerate(BATCHES):
        weights = _weights(number, rows.shape[0])
        _step(table, optimizer, rows, weights)
        for row, gradient in _gradient(rows, weights).items():
            accumulators[row] += gradient**2
            values[row] -= 0.3 * gradient / (np.sqrt(accumulators[row]) + 1e-7)
        assert table.weight.grad is not None
        assert table.weight.grad.is_sparse == sparse
    np.testing.assert_allclose(table.weight.detach().numpy(), values, rtol=1e-6, atol=1e-7)
    state = optimizer.state[table.weight]["sum"].numpy()
    np.testing.assert_allclose(state, accumulators, rtol=1e-6)
    untouched = [0, 3, 5]
    assert np.all(state[untouched] == np.float32(0.1))


def test_sparse_and_dense_tables_train_to_the_same_weights() -> None:
    """The fused dense Keras Adagrad and the sparse one on the same batches: the same weights (float32 rounding)."""
    tables = []
    for sparse in (False, True):
        torch.manual_seed(3)
        table = nn.Embedding(50, 8, sparse=sparse)
        optimizer = (sparse_keras_adagrad if sparse else keras_adagrad)(table.parameters(), 0.1)
        rng = np.random.default_rng(1)
        for _ in range(20):
            rows = rng.integers(0, 50, 64)
            _step(table, optimizer, rows, rng.normal(size=(64, 8)))
        tables.append(table.weight.detach())
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_row_wise_adagrad_keeps_one_accumulator_per_row(sparse: bool) -> None:
    """``a_r += mean(g_r**2); row_r -= lr g_r / (sqrt(a_r) + eps)`` by hand, duplicates summed first."""
    torch.manual_seed(1)
    table = nn.Embedding(ROWS, DIM, sparse=sparse)
    values = table.weight.detach().double().numpy().copy()
    accumulators = np.full(ROWS, 0.1)
    optimizer = RowWiseAdagrad(table.parameters(), lr=0.2)
    for number, rows in enumerate(BATCHES):
        weights = _weights(10 + number, rows.shape[0])
        _step(table, optimizer, rows, weights)
        for row, gradient in _gradient(rows, weights).items():
            accumulators[row] += np.mean(gradient**2)
            values[row] -= 0.2 * gradient / (np.sqrt(accumulators[row]) + 1e-7)
    np.testing.assert_allclose(table.weight.detach().numpy(), values, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(optimizer.state[table.weight]["sum"].numpy(), accumulators, rtol=1e-6)
    assert optimizer.state[table.weight]["sum"].shape == (ROWS,)


def test_row_wise_adagrad_refuses_what_it_cannot_update() -> None:
    with pytest.raises(ValueError, match=r"RowWiseAdagrad takes 2-D tables, got a parameter of shape \(4,\)"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(4, 2))], lr=-1)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got nan"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(4, 2))], eps=float("nan"))


def test_lazy_adam_steps_as_keras_adam_on_the_touched_rows() -> None:
    """Keras's Adam by hand on the rows of each batch (duplicates summed, moments of other rows not decayed,
    epsilon added to the uncorrected root), with one step count per table."""
    torch.manual_seed(0)
    table = nn.Embedding(ROWS, DIM, sparse=True)
    values = table.weight.detach().double().numpy().copy()
    first, second = np.zeros((ROWS, DIM)), np.zeros((ROWS, DIM))
    optimizer = LazyAdam(table.parameters(), lr=0.01, betas=(0.8, 0.9))
    for number, rows in enumerate(BATCHES * 2):
        weights = _weights(number, rows.shape[0])
        _step(table, optimizer, rows, weights)
        t = number + 1
        rate = 0.01 * np.sqrt(1 - 0.9**t) / (1 - 0.8**t)
        for row, gradient in _gradient(rows, weights).items():
            first[row] = 0.8 * first[row] + 0.2 * gradient
            second[row] = 0.9 * second[row] + 0.1 * gradient**2
            values[row] -= rate * first[row] / (np.sqrt(second[row]) + 1e-7)
    np.testing.assert_allclose(table.weight.detach().numpy(), values, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(optimizer.state[table.weight]["exp_avg"].numpy()[[0, 3, 5]], 0.0)


def test_lazy_adam_agrees_with_torchs_adam_and_sparse_adam_without_epsilon() -> None:
    """Keras's and torch's forms differ only in where epsilon goes: with an epsilon far below every root (1e-30;
    torch refuses 0) the updates are one formula, so torch's own Adam (dense) and SparseAdam (sparse) are
    independent checks."""
    for sparse, reference in ((False, torch.optim.Adam), (True, torch.optim.SparseAdam)):
        tables = []
        for _ in range(2):
            torch.manual_seed(1)
            tables.append(nn.Embedding(ROWS, DIM, sparse=sparse))
        ours = LazyAdam(tables[0].parameters(), lr=0.05, eps=1e-30)
        theirs = reference(list(tables[1].parameters()), lr=0.05, eps=1e-30)
        # A first batch of every row: a row never touched would be 0 / (0 + 1e-30) in the dense update.
        for number, rows in enumerate([np.arange(ROWS), *BATCHES, *BATCHES]):
            weights = _weights(10 + number, rows.shape[0])
            _step(tables[0], ours, rows, weights)
            _step(tables[1], theirs, rows, weights)
        torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=1e-5, atol=1e-6)


def test_make_optimizer_names_each_optimizer() -> None:
    table = nn.Embedding(ROWS, DIM, sparse=True)
    assert type(make_optimizer("adagrad", table.parameters(), 0.1, sparse=True)).__name__ == "SparseAdagrad"
    assert isinstance(make_optimizer("adagrad", table.parameters(), 0.1, sparse=False), torch.optim.Adagrad)
    assert isinstance(make_optimizer("rowwise-adagrad", table.parameters(), 0.1, sparse=True), RowWiseAdagrad)
    assert isinstance(make_optimizer("adam", table.parameters(), 0.001, sparse=True), LazyAdam)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("sgd", table.parameters(), 0.1, sparse=True)
    with pytest.raises(ValueError, match="needs 2-D tables only"):
        make_optimizer("rowwise-adagrad", [nn.Parameter(torch.zeros(3))], 0.1, sparse=False)
    with pytest.raises(ValueError, match="betas must be two numbers"):
        LazyAdam(table.parameters(), betas=(0.9, 1.0))
