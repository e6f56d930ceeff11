"""Frequency estimation, negative samplers, mixed negatives, learnable temperature and cached negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import MIN_FLOAT, reference_loss
from twotower import Retrieval
from twotower.sampling import (
    CountingEstimator,
    CrossBatchNegatives,
    PopularitySampler,
    StreamingFrequencyEstimator,
    UniformSampler,
    mixed_inclusion_probability,
)

# Chi-square critical value for 9 degrees of freedom at p = 0.001 (statistical tables).
CHI2_9_DOF_P001 = 27.877


def test_streaming_estimator_converges_to_known_inclusion_probabilities() -> None:
    """Item i is in each batch independently with probability p_i: the estimate must approach p_i.

    Stated bound: the average-gap EMA with rate alpha has relative spread about sqrt(alpha / 2) * sqrt(1 - p);
    we assert a relative error below 4 * sqrt(alpha / 2) for every item after 20,000 steps.
    """
    generator = torch.Generator().manual_seed(0)
    truth = torch.linspace(0.02, 0.5, 40, dtype=torch.float64)
    ids = torch.arange(40) * 7919 + 13
    estimator = StreamingFrequencyEstimator(num_buckets=1 << 16, alpha=0.01)
    assert torch.unique(estimator._buckets(ids)).numel() == 40, "the test needs no hash collisions"
    for _ in range(20_000):
        present = torch.rand(40, generator=generator, dtype=torch.float64) < truth
        estimator.update(ids[present])
    estimate = estimator.probability(ids).double()
    relative_error = ((estimate - truth).abs() / truth).max().item()
    assert relative_error < 4 * math.sqrt(0.01 / 2)


def test_streaming_estimator_in_range_and_unseen_ids() -> None:
    estimator = StreamingFrequencyEstimator(num_buckets=1024, alpha=0.1, initial_gap=50.0)
    probability = estimator.update([1, 2, 2, 3])
    assert torch.all((probability > 0) & (probability <= 1))
    assert estimator.probability([999]).item() == pytest.approx(1 / 50)
    for _ in range(200):
        estimator.update([1])
    # The average gap decays from 50 towards 1 as 1 + 49 * 0.9^n.
    assert estimator.probability([1]).item() == pytest.approx(1 / (1 + 49 * 0.9**199), rel=1e-4)


def test_counting_estimator_is_exact() -> None:
    estimator = CountingEstimator(num_items=4, min_count=0.5)
    estimator.update([0, 0, 1, 2])
    estimator.update([0, 1])
    counts = np.array([3.0, 2.0, 1.0, 0.5])  # item 3 unseen: its pseudo-count
    frequency = counts / counts.sum()
    got = estimator.probability([0, 1, 2, 3], batch_size=8).numpy()
    np.testing.assert_allclose(got, 1 - (1 - frequency) ** 8, rtol=1e-6)


def test_popularity_sampler_frequencies_chi_square() -> None:
    counts = np.arange(1, 11, dtype=np.float64) ** 2
    sampler = PopularitySampler(counts, alpha=0.75)
    expected_probability = counts**0.75 / np.sum(counts**0.75)
    ids, _ = sampler.sample(200_000, generator=torch.Generator().manual_seed(1))
    observed = np.bincount(ids.numpy(), minlength=10)
    expected = expected_probability * 200_000
    chi_square = float(np.sum((observed - expected) ** 2 / expected))
    assert chi_square < CHI2_9_DOF_P001


def test_inclusion_probabilities_match_simulation() -> None:
    sampler = PopularitySampler([1.0, 2.0, 3.0, 10.0, 0.5], alpha=1.0)
    generator = torch.Generator().manual_seed(2)
    trials, draws = 20_000, 3
    hits = np.zeros(5)
    for _ in range(trials):
        ids, _ = sampler.sample(draws, generator=generator)
        hits[np.unique(ids.numpy())] += 1
    stated = sampler.inclusion(torch.arange(5), draws).numpy()
    # Binomial standard error of the empirical inclusion rate; 5 sigma.
    tolerance = 5 * np.sqrt(stated * (1 - stated) / trials)
    assert np.all(np.abs(hits / trials - stated) < tolerance)
    uniform = UniformSampler(8)
    ids, inclusion = uniform.sample(5, generator=generator, unique=True)
    assert len(set(ids.tolist())) == 5
    assert torch.allclose(inclusion, torch.full((5,), 5 / 8))


def test_mixed_negative_loss_equals_hand_built_logits() -> None:
    """In-batch positives plus sampled negatives, corrected by the mixed inclusion probability."""
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(4, 3)).astype(np.float32)
    in_batch_ids = np.array([5, 7, 5, 9])
    sampled_ids = np.array([7, 2, 11])
    item_embeddings = {i: rng.normal(size=3).astype(np.float32) for i in range(12)}
    candidates = np.stack([item_embeddings[i] for i in [*in_batch_ids, *sampled_ids]])
    in_batch_inclusion = {i: p for i, p in zip(range(12), rng.uniform(0.01, 0.5, size=12), strict=True)}
    sampler = UniformSampler(12)
    all_ids = np.array([*in_batch_ids, *sampled_ids])
    q = torch.tensor([in_batch_inclusion[i] for i in all_ids], dtype=torch.float32)
    s = sampler.inclusion(torch.as_tensor(all_ids), num_samples=3)
    probability = mixed_inclusion_probability(q, s)
    loss = Retrieval(remove_accidental_hits=True)(
        torch.as_tensor(queries),
        torch.as_tensor(candidates),
        candidate_sampling_probability=probability,
        candidate_ids=torch.as_tensor(all_ids),
    )
    # By hand: 3 uniform draws with replacement include an item with probability s = 1 - (11/12)^3; logits
    # q.c - log(1 - (1 - q)(1 - s)), duplicates of the positive's id removed.
    sampled_inclusion = 1 - (11 / 12) ** 3
    logits = queries.astype(np.float64) @ candidates.T.astype(np.float64)
    for j, item in enumerate(all_ids):
        logits[:, j] -= math.log(1 - (1 - in_batch_inclusion[item]) * (1 - sampled_inclusion))
    for i in range(4):
        for j in range(len(all_ids)):
            if j != i and all_ids[j] == all_ids[i]:
                logits[i, j] += MIN_FLOAT
    labels = np.eye(4, len(all_ids))
    assert float(loss) == pytest.approx(reference_loss(logits, labels), rel=1e-5)


def test_known_positive_ids_per_row_are_masked() -> None:
    rng = np.random.default_rng(4)
    queries = torch.as_tensor(rng.normal(size=(3, 4)), dtype=torch.float32)
    candidates = torch.as_tensor(rng.normal(size=(6, 4)), dtype=torch.float32)
    ids = ["a", "b", "c", "d", "e", "a"]
    positive_ids = [["d", "e"], [], ["a", "zzz"]]
    loss = Retrieval()(queries, candidates, candidate_ids=ids, positive_ids=positive_ids)
    logits = queries.double().numpy() @ candidates.double().numpy().T
    removed = {(0, 3), (0, 4), (2, 0), (2, 5)}
    for i, j in removed:
        logits[i, j] = MIN_FLOAT
    assert float(loss) == pytest.approx(reference_loss(logits, np.eye(3, 6)), rel=1e-5)
    with pytest.raises(ValueError, match="positive_ids requires candidate_ids"):
        Retrieval()(queries, candidates, positive_ids=positive_ids)
    with pytest.raises(ValueError, match="one row per query"):
        Retrieval()(queries, candidates, candidate_ids=ids, positive_ids=[["a"]])


def test_learnable_temperature() -> None:
    rng = np.random.default_rng(5)
    queries = torch.as_tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    candidates = torch.as_tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    task = Retrieval(temperature=0.5, learnable_temperature=True, temperature_range=(0.05, 5.0))
    loss = task(queries, candidates)
    logits = queries.double().numpy() @ candidates.double().numpy().T / 0.5
    assert float(loss.detach()) == pytest.approx(reference_loss(logits, np.eye(4)), rel=1e-5)
    loss.backward()
    # d loss / d log t = -sum_ij (softmax_ij - y_ij) * logit_ij, by hand.
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    expected = -np.sum((softmax - np.eye(4)) * logits)
    assert task.log_temperature.grad is not None
    assert float(task.log_temperature.grad) == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        task.log_temperature.fill_(math.log(100.0))
    assert float(task.current_temperature()) == pytest.approx(5.0)  # clamped
    with pytest.raises(ValueError, match="initial temperature"):
        Retrieval(learnable_temperature=True)
    with pytest.raises(ValueError, match="outside temperature_range"):
        Retrieval(temperature=20.0, learnable_temperature=True)


def test_cross_batch_negatives_join_later_batches() -> None:
    rng = np.random.default_rng(6)
    cache = CrossBatchNegatives(capacity=5)
    task = Retrieval(remove_accidental_hits=True, negative_cache=cache)
    first_q = torch.as_tensor(rng.normal(size=(3, 2)), dtype=torch.float32)
    first_c = torch.as_tensor(rng.normal(size=(3, 2)), dtype=torch.float32, device="cpu").requires_grad_(True)
    task(first_q, first_c, candidate_ids=[1, 2, 3])
    assert len(cache) == 3
    assert not cache.embeddings.requires_grad  # type: ignore[union-attr]
    second_q = torch.as_tensor(rng.normal(size=(2, 2)), dtype=torch.float32)
    second_c = torch.as_tensor(rng.normal(size=(2, 2)), dtype=torch.float32)
    loss = task(second_q, second_c, candidate_ids=[3, 4])
    # By hand: the first batch's positives are extra negatives; cached id 3 is query 0's accidental hit.
    all_c = np.concatenate([second_c.numpy(), first_c.detach().numpy()]).astype(np.float64)
    logits = second_q.double().numpy() @ all_c.T
    logits[0, 4] += MIN_FLOAT
    assert float(loss) == pytest.approx(reference_loss(logits, np.eye(2, 5)), rel=1e-5)
    assert len(cache) == 5
    task(second_q, second_c, candidate_ids=[8, 9])
    assert len(cache) == 5
    np.testing.assert_array_equal(cache.codes, [3, 3, 4, 8, 9])  # type: ignore[arg-type]
    task.eval()
    task(second_q, second_c, candidate_ids=[8, 9])
    np.testing.assert_array_equal(cache.codes, [3, 3, 4, 8, 9])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="requires candidate_ids"):
        task(second_q, second_c)


class TestBadInput:
    def test_estimators(self) -> None:
        with pytest.raises(ValueError, match="alpha"):
            StreamingFrequencyEstimator(alpha=0.0)
        with pytest.raises(ValueError, match="num_buckets"):
            StreamingFrequencyEstimator(num_buckets=0)
        with pytest.raises(TypeError, match="integer ids"):
            StreamingFrequencyEstimator().update(["a"])
        with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
            CountingEstimator(3).update([3])

    def test_samplers(self) -> None:
        with pytest.raises(ValueError, match=r"alpha must lie in \[0.0, 64.0\]"):
            PopularitySampler([1.0, 2.0], alpha=-0.5)
        with pytest.raises(ValueError, match="non-negative"):
            PopularitySampler([1.0, -2.0])
        with pytest.raises(ValueError, match="all be zero"):
            PopularitySampler([0.0, 0.0])
        with pytest.raises(ValueError, match="cannot draw 9 unique negatives from a corpus of 4"):
            UniformSampler(4).sample(9, unique=True)
        with pytest.raises(ValueError, match="unique sampling is only offered"):
            PopularitySampler([1.0, 2.0]).sample(1, unique=True)

    def test_probabilities_outside_the_unit_interval(self) -> None:
        with pytest.raises(ValueError, match=r"in_batch probabilities must lie in \[0, 1\]"):
            mixed_inclusion_probability(torch.tensor([1.5]), torch.tensor([0.1]))
        with pytest.raises(ValueError, match="sampled contains 1 non-finite"):
            mixed_inclusion_probability(torch.tensor([0.5]), torch.tensor([float("nan")]))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Retrieval()(torch.randn(2, 2), torch.randn(2, 2), candidate_sampling_probability=torch.tensor([0.5, -0.1]))

    def test_cache(self) -> None:
        with pytest.raises(ValueError, match="capacity"):
            CrossBatchNegatives(0)
        cache = CrossBatchNegatives(4)
        cache.push(torch.randn(2, 3))
        with pytest.raises(ValueError, match="dimension 3"):
            cache.push(torch.randn(2, 4))
        with pytest.raises(TypeError, match="negative_cache"):
            Retrieval(negative_cache=[])  # type: ignore[arg-type]
