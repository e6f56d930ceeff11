"""Each loss piece on its own, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MIN_FLOAT
from twotower.losses import (
    HardNegativeMining,
    RemoveAccidentalHits,
    SamplingProbabilityCorrection,
    SoftmaxCrossEntropy,
)


def test_sampling_probability_correction() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    probability = torch.tensor([0.5, 0.0, 2e-6])
    out = SamplingProbabilityCorrection()(logits, probability)
    expected = logits.numpy() - np.log([0.5, 1e-6, 2e-6])[None, :]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_remove_accidental_hits_marks_duplicates_of_the_positive_only() -> None:
    labels = torch.eye(3, 5)
    logits = torch.zeros(3, 5)
    ids = torch.tensor([7, 8, 7, 8, 9])
    out = RemoveAccidentalHits()(labels, logits, ids).numpy()
    expected = np.zeros((3, 5))
    expected[0, 2] = expected[1, 3] = expected[2, 0] = MIN_FLOAT
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_hard_negative_mining_selects_positive_then_hardest() -> None:
    logits = torch.tensor([[0.1, 5.0, 0.3, 4.0, -2.0], [9.0, 0.0, 1.0, 2.0, 3.0]])
    labels = torch.eye(2, 5)
    out_logits, out_labels = HardNegativeMining(2)(logits, labels)
    np.testing.assert_allclose(out_logits.numpy(), [[0.1, 5.0, 4.0], [0.0, 9.0, 3.0]], rtol=1e-7)
    np.testing.assert_array_equal(out_labels.numpy(), [[1, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize("n", [0, -1, 4, 10])
def test_hard_negative_mining_keeps_everything_when_documented(n: int) -> None:
    logits, labels = torch.randn(2, 5), torch.eye(2, 5)
    out_logits, out_labels = HardNegativeMining(n)(logits, labels)
    assert out_logits is logits
    assert out_labels is labels


def test_hard_negative_mining_is_differentiable_through_the_gather() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]], requires_grad=True)
    out, _ = HardNegativeMining(1)(logits, torch.eye(1, 4))
    out.sum().backward()
    assert logits.grad is not None
    np.testing.assert_array_equal(logits.grad.numpy(), [[1.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softmax_cross_entropy(reduction: str) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    weights = torch.tensor([2.0, 0.5])
    loss = SoftmaxCrossEntropy(reduction)(labels, logits, weights)  # type: ignore[arg-type]
    per_row = [np.log(np.exp(2) + np.exp(1) + 1) - 2, np.log(2 + np.exp(3)) - 0]
    total = 2.0 * per_row[0] + 0.5 * per_row[1]
    assert float(loss) == pytest.approx(total / 2 if reduction == "mean" else total, rel=1e-6)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(TypeError, match="num_hard_negatives"):
        HardNegativeMining(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate_sampling_probability"):
        SamplingProbabilityCorrection()(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="candidate_ids"):
        RemoveAccidentalHits()(torch.eye(2, 3), torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        HardNegativeMining(1)(torch.zeros(2, 3), torch.eye(2, 2))
    with pytest.raises(ValueError, match="sample_weight"):
        SoftmaxCrossEntropy()(torch.eye(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        SoftmaxCrossEntropy("none")  # type: ignore[arg-type]
