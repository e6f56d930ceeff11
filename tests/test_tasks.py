"""The Retrieval task against the numpy references and the closed forms of the semantics document."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from reference import (
    reference_logits,
    reference_loss,
    reference_row_auc,
    reference_top_k_hits,
    weighted_mean,
)
from twotower import BatchAUC, BatchTopKAccuracy, BruteForce, FactorizedTopK, LossMean, Retrieval
from twotower.losses import MIN_FLOAT, in_batch_softmax_cross_entropy


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _random(nq: int, nc: int, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(nq, d, generator=generator), torch.randn(nc, d, generator=generator)


def _check(task: Retrieval, queries: torch.Tensor, candidates: torch.Tensor, **call: object) -> float:
    """Run the task and the reference with the same options; assert equal losses; return the loss."""
    loss = task(queries, candidates, **call)  # type: ignore[arg-type]
    ids = call.get("candidate_ids")
    probability = call.get("candidate_sampling_probability")
    mask = call.get("score_mask")
    weights = call.get("sample_weight")
    logits, labels = reference_logits(
        queries.numpy(),
        candidates.numpy(),
        temperature=task.temperature,
        probability=None if probability is None else np.asarray(probability),
        ids=None if ids is None else list(np.asarray(ids).tolist()),
        remove_accidental_hits=task.remove_accidental_hits,
        mask=None if mask is None else np.asarray(mask),
        num_hard_negatives=task.num_hard_negatives,
    )
    reduction = getattr(task.loss_fn, "reduction", "sum")
    expected = reference_loss(logits, labels, None if weights is None else np.asarray(weights), reduction)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    return float(loss)


class TestClosedForms:
    """The closed forms quoted from TFRS's own tests in the semantics document."""

    queries = torch.tensor([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    candidates = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    def test_loss(self) -> None:
        loss = Retrieval()(self.queries, self.candidates)
        assert float(loss) == pytest.approx(-math.log(_sigmoid(3)) - math.log(1 - _sigmoid(4)), rel=1e-6)

    def test_weighted_loss_and_batch_accuracy(self) -> None:
        accuracy = BatchTopKAccuracy(k=1)
        task = Retrieval(batch_metrics=[accuracy])
        loss = task(self.queries, self.candidates, sample_weight=torch.tensor([0.7, 0.3]))
        expected = -0.7 * math.log(_sigmoid(3)) - 0.3 * math.log(1 - _sigmoid(4))
        assert float(loss) == pytest.approx(expected, rel=1e-6)
        assert float(accuracy.compute()) == pytest.approx(0.7, rel=1e-6)
        accuracy.reset()
        task(self.queries, self.candidates)
        assert float(accuracy.compute()) == pytest.approx(0.5)

    def test_logits(self) -> None:
        logits, labels = Retrieval().compute_logits(self.queries, self.candidates)
        np.testing.assert_array_equal(logits.numpy(), [[6.0, 3.0], [9.0, 5.0]])
        np.testing.assert_array_equal(labels.numpy(), np.eye(2))


class TestEachOption:
    @pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 3.0])
    def test_temperature(self, temperature: float) -> None:
        queries, candidates = _random(5, 5)
        _check(Retrieval(temperature=temperature), queries, candidates)

    @pytest.mark.parametrize("n", [-3, 0, 1, 2, 5, 6, 7, 50])
    def test_hard_negatives(self, n: int) -> None:
        queries, candidates = _random(6, 8)
        task = Retrieval(num_hard_negatives=n)
        loss = _check(task, queries, candidates)
        logits, _ = task.compute_logits(queries, candidates)
        # 8 candidates: 7 negatives. Non-positive or >= 7 keeps all (documented), else n + 1 columns.
        assert logits.shape[1] == (n + 1 if 0 < n < 7 else 8)
        if n <= 0:
            # TFRS's code would give 0 for n = 0; the documented behaviour keeps all negatives.
            assert loss == pytest.approx(float(Retrieval()(queries, candidates)), rel=1e-6)
            assert loss > 0

    def test_hard_negatives_keep_the_largest(self) -> None:
        queries = torch.tensor([[1.0, 0.0]])
        candidates = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
        logits, labels = Retrieval(num_hard_negatives=2).compute_logits(queries, candidates)
        np.testing.assert_array_equal(logits.numpy(), [[0.0, 3.0, 2.0]])
        np.testing.assert_array_equal(labels.numpy(), [[1.0, 0.0, 0.0]])
        expected = math.log(1 + math.exp(3) + math.exp(2))
        assert float(Retrieval(num_hard_negatives=2)(queries, candidates)) == pytest.approx(expected, rel=1e-6)

    def test_accidental_hits_integer_ids(self) -> None:
        queries, candidates = _random(5, 5)
        ids = torch.tensor([3, 1, 3, 2, 1])
        loss = _check(Retrieval(remove_accidental_hits=True), queries, candidates, candidate_ids=ids)
        assert loss != pytest.approx(float(Retrieval()(queries, candidates)), rel=1e-4)

    def test_accidental_hits_string_ids_and_duplicates_among_extra_negatives(self) -> None:
        queries, candidates = _random(3, 7)
        # "a" is query 0's positive and also two extra negatives; "z" twice among extras only.
        ids = ["a", "b", "c", "a", "z", "z", "a"]
        task = Retrieval(remove_accidental_hits=True)
        _check(task, queries, candidates, candidate_ids=ids)
        logits, _ = task.compute_logits(queries, candidates, candidate_ids=ids)
        assert (logits[0, [3, 6]] < -1e35).all()
        assert (logits[1:, 3:] > -1e35).all()
        assert (logits[0, [1, 2, 4, 5]] > -1e35).all()

    def test_accidental_hits_with_numpy_ids_equal_tensor_ids(self) -> None:
        queries, candidates = _random(4, 6)
        ids = np.array([5, 6, 5, 7, 6, 9])
        task = Retrieval(remove_accidental_hits=True)
        assert float(task(queries, candidates, candidate_ids=ids)) == pytest.approx(
            float(task(queries, candidates, candidate_ids=torch.as_tensor(ids))), rel=1e-7
        )

    def test_sampling_correction(self) -> None:
        queries, candidates = _random(4, 6)
        probability = torch.tensor([0.1, 0.5, 0.01, 1.0, 0.3, 0.2])
        _check(Retrieval(), queries, candidates, candidate_sampling_probability=probability)

    def test_zero_probability_is_clipped(self) -> None:
        queries, candidates = _random(3, 3)
        zero = Retrieval()(queries, candidates, candidate_sampling_probability=torch.tensor([0.0, 0.5, 0.2]))
        clipped = Retrieval()(queries, candidates, candidate_sampling_probability=torch.tensor([1e-6, 0.5, 0.2]))
        assert float(zero) == pytest.approx(float(clipped), rel=1e-7)
        _check(Retrieval(), queries, candidates, candidate_sampling_probability=torch.tensor([0.0, 0.5, 0.2]))

    def test_sample_weight_with_zeros(self) -> None:
        queries, candidates = _random(5, 5)
        weights = torch.tensor([0.0, 1.0, 2.5, 0.0, 0.5])
        _check(Retrieval(), queries, candidates, sample_weight=weights)
        all_zero = Retrieval()(queries, candidates, sample_weight=torch.zeros(5))
        assert float(all_zero) == 0.0

    def test_sample_weight_column_vector_and_list(self) -> None:
        queries, candidates = _random(3, 3)
        column = Retrieval()(queries, candidates, sample_weight=torch.tensor([[1.0], [2.0], [3.0]]))
        listed = Retrieval()(queries, candidates, sample_weight=[1.0, 2.0, 3.0])
        assert float(column) == pytest.approx(float(listed), rel=1e-7)

    def test_extra_candidates_are_shared_negatives(self) -> None:
        queries, candidates = _random(3, 10)
        _check(Retrieval(), queries, candidates)
        # Adding a hopeless extra negative barely changes the loss; a perfect copy of a positive raises it.
        far = torch.cat([candidates, -100 * queries.sum(0, keepdim=True)])
        assert float(Retrieval()(queries, far)) == pytest.approx(float(Retrieval()(queries, candidates)), rel=1e-6)

    def test_score_mask(self) -> None:
        queries, candidates = _random(4, 6)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[0, 3] = mask[2, 1] = mask[3, 5] = False
        _check(Retrieval(), queries, candidates, score_mask=mask)

    @pytest.mark.parametrize("reduction", ["sum", "mean"])
    def test_reductions(self, reduction: str) -> None:
        queries, candidates = _random(6, 9)
        weights = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 3.0])
        loss = _check(Retrieval(reduction=reduction), queries, candidates, sample_weight=weights)  # type: ignore[arg-type]
        total = float(Retrieval()(queries, candidates, sample_weight=weights))
        assert loss == pytest.approx(total / 6 if reduction == "mean" else total, rel=1e-6)


OPTION_GRID = list(
    itertools.product(
        [None, 0.2],  # temperature
        [None, 2],  # num_hard_negatives
        [False, True],  # remove_accidental_hits
        [False, True],  # sampling probability
        [False, True],  # sample weights
        [False, True],  # score mask
    )
)


@pytest.mark.parametrize(("temperature", "hard", "remove", "with_p", "with_w", "with_mask"), OPTION_GRID)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_option_combinations(
    temperature: float | None,
    hard: int | None,
    remove: bool,
    with_p: bool,
    with_w: bool,
    with_mask: bool,
    reduction: str,
) -> None:
    nq, nc = 6, 9
    rng = np.random.default_rng(hash((temperature, hard, remove, with_p, with_w, with_mask)) % 2**32)
    queries = torch.as_tensor(rng.normal(size=(nq, 5)), dtype=torch.float32)
    candidates = torch.as_tensor(rng.normal(size=(nc, 5)), dtype=torch.float32)
    call: dict[str, object] = {"candidate_ids": torch.as_tensor(rng.integers(0, 4, size=nc))}
    if with_p:
        call["candidate_sampling_probability"] = torch.as_tensor(rng.uniform(0.0, 1.0, size=nc), dtype=torch.float32)
    if with_w:
        call["sample_weight"] = torch.as_tensor(rng.uniform(0.0, 2.0, size=nq), dtype=torch.float32)
    if with_mask:
        mask = rng.uniform(size=(nq, nc)) > 0.2
        mask[np.arange(nq), np.arange(nq)] = True
        call["score_mask"] = torch.as_tensor(mask)
    accuracy, auc = BatchTopKAccuracy(k=2), BatchAUC()
    task = Retrieval(
        temperature=temperature,
        num_hard_negatives=hard,
        remove_accidental_hits=remove,
        batch_metrics=[accuracy, auc],
        reduction=reduction,  # type: ignore[arg-type]
    )
    _check(task, queries, candidates, **call)
    logits, labels = reference_logits(
        queries.numpy(),
        candidates.numpy(),
        temperature,
        None if not with_p else np.asarray(call["candidate_sampling_probability"]),
        np.asarray(call["candidate_ids"]).tolist(),
        remove,
        None if not with_mask else np.asarray(call["score_mask"]),
        hard,
    )
    weights = None if not with_w else np.asarray(call["sample_weight"], dtype=np.float64)
    assert float(accuracy.compute()) == pytest.approx(
        weighted_mean(reference_top_k_hits(logits, labels, 2), weights), rel=1e-6
    )
    assert float(auc.compute()) == pytest.approx(weighted_mean(reference_row_auc(logits, labels), weights), rel=1e-6)


class TestMetricSwitches:
    def _task(self) -> tuple[Retrieval, LossMean, BatchTopKAccuracy, FactorizedTopK]:
        _queries, candidates = _random(4, 4, seed=3)
        loss_mean, accuracy = LossMean(), BatchTopKAccuracy()
        factorized = FactorizedTopK(BruteForce().index(candidates), ks=(1, 2))
        return (
            Retrieval(metrics=factorized, batch_metrics=[accuracy], loss_metrics=[loss_mean]),
            loss_mean,
            accuracy,
            factorized,
        )

    def test_switches_off(self) -> None:
        task, loss_mean, accuracy, factorized = self._task()
        queries, candidates = _random(4, 4, seed=3)
        loss = task(queries, candidates, compute_metrics=False, compute_batch_metrics=False)
        assert float(loss_mean.compute()) == pytest.approx(float(loss))
        assert float(accuracy.total_weight) == 0.0
        assert float(factorized.total_weight) == 0.0

    def test_switches_on_and_loss_mean_over_calls(self) -> None:
        task, loss_mean, accuracy, factorized = self._task()
        queries, candidates = _random(4, 4, seed=3)
        first = float(task(queries, candidates))
        second = float(task(queries * 2, candidates))
        assert float(loss_mean.compute()) == pytest.approx((first + second) / 2, rel=1e-6)
        assert float(accuracy.total_weight) == 8.0
        assert float(factorized.total_weight) == 8.0
        names = set(task.metric_results())
        assert names == {
            "loss_mean",
            "batch_top_1_categorical_accuracy",
            "factorized_top_k/top_1_categorical_accuracy",
            "factorized_top_k/top_2_categorical_accuracy",
        }
        task.reset_metrics()
        assert all(value == 0.0 for value in task.metric_results().values())


class TestFactorizedMetricThroughTheTask:
    """The task hands (Q, C[:nq], ids[:nq], weights) to the factorized metric; checked against numpy ranks."""

    def test_score_based(self) -> None:
        rng = np.random.default_rng(7)
        corpus = rng.normal(size=(40, 6)).astype(np.float32)
        queries = rng.normal(size=(10, 6)).astype(np.float32)
        positives = corpus[rng.integers(0, 40, size=10)]
        extra = rng.normal(size=(5, 6)).astype(np.float32)
        weights = rng.uniform(0.1, 1.0, size=10).astype(np.float32)
        metric = FactorizedTopK(BruteForce().index(torch.as_tensor(corpus)), ks=(1, 3, 10))
        task = Retrieval(metrics=[metric])
        task(
            torch.as_tensor(queries),
            torch.as_tensor(np.concatenate([positives, extra])),
            sample_weight=torch.as_tensor(weights),
        )
        scores = queries.astype(np.float64) @ corpus.T.astype(np.float64)
        positive_scores = np.sum(queries.astype(np.float64) * positives, axis=1)
        results = metric.results()
        for k in (1, 3, 10):
            top_k = -np.sort(-scores, axis=1)[:, :k]
            hits = (np.sum(top_k > positive_scores[:, None] + 1e-9, axis=1) < k).astype(np.float64)
            expected = np.sum(hits * weights) / np.sum(weights)
            assert results[f"factorized_top_k/top_{k}_categorical_accuracy"] == pytest.approx(expected, rel=1e-6)

    def test_id_based_with_extra_negatives_passes_positive_ids(self) -> None:
        rng = np.random.default_rng(8)
        corpus = rng.normal(size=(30, 4)).astype(np.float32)
        names = np.array([f"item{i}" for i in range(30)])
        queries = rng.normal(size=(8, 4)).astype(np.float32)
        chosen = rng.integers(0, 30, size=8)
        extra = rng.integers(0, 30, size=4)
        candidates = corpus[np.concatenate([chosen, extra])]
        metric = FactorizedTopK(BruteForce().index(torch.as_tensor(corpus), names), ks=(1, 5))
        task = Retrieval(metrics=metric, remove_accidental_hits=True)
        task(
            torch.as_tensor(queries),
            torch.as_tensor(candidates),
            candidate_ids=names[np.concatenate([chosen, extra])],
        )
        order = np.argsort(-(queries.astype(np.float64) @ corpus.T), axis=1, kind="stable")
        for k in (1, 5):
            expected = np.mean([chosen[i] in order[i, :k] for i in range(8)])
            assert metric.results()[f"factorized_top_k/top_{k}_categorical_accuracy"] == pytest.approx(expected)


class TestDtypesAndDevices:
    def test_float64(self) -> None:
        queries, candidates = _random(5, 7)
        _check(Retrieval(temperature=0.3, num_hard_negatives=3), queries.double(), candidates.double())

    def test_bfloat16_is_computed_in_float32(self) -> None:
        queries, candidates = _random(5, 7)
        low_q, low_c = queries.bfloat16(), candidates.bfloat16()
        loss = Retrieval()(low_q, low_c)
        assert loss.dtype == torch.float32
        expected = reference_loss(*reference_logits(low_q.float().numpy(), low_c.float().numpy()))
        assert float(loss) == pytest.approx(expected, rel=1e-5)

    def test_multi_head_queries_take_the_best_head(self) -> None:
        generator = torch.Generator().manual_seed(1)
        queries = torch.randn(3, 2, 4, generator=generator)
        candidates = torch.randn(5, 4, generator=generator)
        logits, _ = Retrieval().compute_logits(queries, candidates)
        expected = np.max(np.einsum("qhd,cd->qhc", queries.numpy(), candidates.numpy()), axis=1)
        np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-6)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
    def test_cuda_matches_cpu(self) -> None:
        queries, candidates = _random(16, 20)
        ids = torch.randint(0, 5, (20,))
        weights = torch.rand(16)
        probability = torch.rand(20)
        task = Retrieval(temperature=0.5, num_hard_negatives=4, remove_accidental_hits=True)
        cpu = task(queries, candidates, weights, probability, ids)
        gpu = task.cuda()(queries.cuda(), candidates.cuda(), weights.cuda(), probability.cuda(), ids.cuda())
        assert float(gpu) == pytest.approx(float(cpu), rel=1e-5)


def test_gradcheck_with_all_options() -> None:
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    candidates = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6])
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5] = False
    probability = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    task = Retrieval(temperature=0.7, num_hard_negatives=3, remove_accidental_hits=True)

    def loss(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return task(q, c, weights, probability, ids, score_mask=mask)

    assert torch.autograd.gradcheck(loss, (queries, candidates), eps=1e-6, atol=1e-6)


def test_gradient_matches_closed_form() -> None:
    """d loss / d q_i = sum_j (softmax_ij - y_ij) c_j for the plain SUM loss."""
    queries, candidates = _random(3, 5)
    queries.requires_grad_(True)
    Retrieval()(queries, candidates).backward()
    q, c = queries.detach().numpy().astype(np.float64), candidates.numpy().astype(np.float64)
    logits = q @ c.T
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    softmax[np.arange(3), np.arange(3)] -= 1.0
    assert queries.grad is not None
    np.testing.assert_allclose(queries.grad.numpy(), softmax @ c, rtol=1e-5, atol=1e-6)


class TestBadInput:
    queries, candidates = _random(3, 4)

    def test_numpy_embeddings_give_the_tensor_loss(self) -> None:
        """TFRS's task takes numpy arrays; so does this one, with the same loss."""
        expected = float(Retrieval()(self.queries, self.candidates))
        assert float(Retrieval()(self.queries.numpy(), self.candidates.numpy())) == expected

    def test_zero_dimensional_embeddings_are_refused(self) -> None:
        with pytest.raises(ValueError, match="query_embeddings must have at least one embedding dimension"):
            Retrieval()(torch.zeros(3, 0), torch.zeros(3, 0))

    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            ({"temperature": 0.0}, ValueError, "temperature"),
            ({"temperature": -1.0}, ValueError, "temperature"),
            ({"temperature": float("nan")}, ValueError, "temperature"),
            ({"temperature": "hot"}, TypeError, "temperature"),
            ({"num_hard_negatives": 1.5}, TypeError, "num_hard_negatives"),
            ({"remove_accidental_hits": "yes"}, TypeError, "remove_accidental_hits"),
            ({"reduction": "max"}, ValueError, "reduction"),
            ({"metrics": [LossMean()]}, TypeError, "metrics"),
            ({"batch_metrics": [object()]}, TypeError, "batch_metrics"),
            ({"loss": 3}, TypeError, "loss"),
        ],
    )
    def test_constructor(self, kwargs: dict[str, object], error: type[Exception], message: str) -> None:
        with pytest.raises(error, match=message):
            Retrieval(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("args", "call", "error", "message"),
        [
            ((queries, candidates[:, :2]), {}, ValueError, "embedding dimension"),
            ((queries, candidates[:2]), {}, ValueError, "at least as many rows"),
            ((queries[:0], candidates), {}, ValueError, "at least one query"),
            ((queries.tolist(), candidates), {}, TypeError, "query_embeddings must be a torch.Tensor"),
            ((queries.long(), candidates), {}, TypeError, "floating-point"),
            ((queries.double(), candidates), {}, TypeError, "share a dtype"),
            ((queries[0], candidates), {}, ValueError, "query_embeddings must have 2 or 3 dimensions"),
            ((queries, candidates), {"sample_weight": torch.ones(4)}, ValueError, "sample_weight"),
            (
                (queries, candidates),
                {"sample_weight": torch.tensor([1.0, -1.0, 1.0])},
                ValueError,
                "non-negative",
            ),
            (
                (queries, candidates),
                {"sample_weight": torch.tensor([1.0, float("nan"), 1.0])},
                ValueError,
                "sample_weight",
            ),
            (
                (queries, candidates),
                {"candidate_sampling_probability": torch.ones(3)},
                ValueError,
                "probability",
            ),
            (
                (queries, candidates),
                {"candidate_sampling_probability": torch.tensor([0.5, 2.0, 0.1, 0.1])},
                ValueError,
                r"\[0, 1\]",
            ),
            (
                (queries, candidates),
                {"candidate_sampling_probability": torch.tensor([0.5, float("nan"), 0.1, 0.1])},
                ValueError,
                "non-finite",
            ),
            ((queries, candidates), {"candidate_ids": torch.arange(3)}, ValueError, "candidate_ids"),
            ((queries, candidates), {"candidate_ids": torch.rand(4)}, TypeError, "candidate_ids"),
            ((queries, candidates), {"score_mask": torch.ones(3, 4)}, TypeError, "score_mask"),
            (
                (queries, candidates),
                {"score_mask": torch.ones(3, 3, dtype=torch.bool)},
                ValueError,
                "score_mask",
            ),
        ],
    )
    def test_call(
        self, args: tuple[object, ...], call: dict[str, object], error: type[Exception], message: str
    ) -> None:
        with pytest.raises(error, match=message):
            Retrieval()(*args, **call)  # type: ignore[arg-type]

    def test_remove_accidental_hits_requires_ids(self) -> None:
        with pytest.raises(ValueError, match="requires candidate_ids"):
            Retrieval(remove_accidental_hits=True)(self.queries, self.candidates)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_embeddings(self, bad: float) -> None:
        broken = self.candidates.clone()
        broken[2, 1] = bad
        with pytest.raises(ValueError, match="candidate_embeddings contains 1 non-finite"):
            Retrieval()(self.queries, broken)
        with pytest.raises(ValueError, match="query_embeddings contains"):
            Retrieval()(broken[:3], self.candidates)


#: How the blocked loss gets its float gradients: computed in the forward ("eager", the default), from the
#: exponentials the forward kept, or recomputed block by block in the backward.
BLOCKED_LOSS_MODES = ("eager", "kept", "recomputed")


def _blocked_loss_mode(monkeypatch: pytest.MonkeyPatch, mode: str, native_kernels: bool = True) -> None:
    """Set how the blocked loss runs (one of :data:`BLOCKED_LOSS_MODES`; bf16 products are never eager);
    ``native_kernels=False`` makes every softmax kernel decline, as on a machine where they are not built, so that
    torch's passes run instead."""
    from twotower import _native, losses

    assert mode in BLOCKED_LOSS_MODES
    if mode != "eager":
        monkeypatch.setattr(losses, "_EAGER_GRADIENTS", False)
    if mode == "recomputed":
        monkeypatch.setattr(losses, "_KEPT_ELEMENTS", 0)
    if native_kernels:
        return
    monkeypatch.setattr(_native, "softmax_rows", lambda logits: None)
    monkeypatch.setattr(_native, "softmax_rows_bf16", lambda logits: None)
    monkeypatch.setattr(_native, "softmax_gradient_rows", lambda logits, log_normalisers, scales: False)


class TestFusedLoss:
    """The blocked loss (no materialised logits) against the materialised path and the numpy reference."""

    @pytest.mark.parametrize("block_rows", [None, 1, 2])
    def test_fully_masked_rows_lose_log_of_the_column_count(self, block_rows: int | None) -> None:
        """A row whose every logit is masked is a softmax over nc equal values: TFRS (Keras's
        softmax_cross_entropy, which subtracts the row maximum first) gives ln(nc), and so does the materialised
        path. The blocked loss used to give 0: MIN_FLOAT + ln(nc) rounds back to MIN_FLOAT in float32."""
        rng = np.random.default_rng(2)
        queries = torch.as_tensor(rng.normal(size=(3, 4)), dtype=torch.float32).requires_grad_(True)
        candidates = torch.as_tensor(rng.normal(size=(5, 4)), dtype=torch.float32).requires_grad_(True)
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[2] = True  # one ordinary row beside the two fully masked ones
        logits = queries.detach().double() @ candidates.detach().double().T
        expected = 2 * math.log(5) + float(torch.logsumexp(logits[2], 0) - logits[2, 2])
        for fused in (None, False):
            loss = Retrieval(fused=fused)(queries, candidates, score_mask=mask)
            assert float(loss) == pytest.approx(expected, rel=1e-6), fused
        per_row = in_batch_softmax_cross_entropy(queries, candidates, score_mask=mask, block_rows=block_rows)
        np.testing.assert_allclose(per_row[:2].detach().numpy(), [math.log(5)] * 2, rtol=1e-6)
        per_row.sum().backward()
        assert queries.grad is not None
        # Masked logits are constants: the fully masked rows get no gradient.
        assert float(queries.grad[:2].abs().max()) == 0.0

    @pytest.mark.parametrize(("temperature", "remove", "with_p", "with_w", "with_mask", "extra"), list(
        itertools.product([None, 0.3], [False, True], [False, True], [False, True], [False, True], [0, 4])
    ))  # fmt: skip
    def test_equals_materialised_loss_and_gradients(
        self, temperature: float | None, remove: bool, with_p: bool, with_w: bool, with_mask: bool, extra: int
    ) -> None:
        rng = np.random.default_rng(17)
        nq, nc = 7, 7 + extra
        base_q = torch.as_tensor(rng.normal(size=(nq, 5)), dtype=torch.float32)
        base_c = torch.as_tensor(rng.normal(size=(nc, 5)), dtype=torch.float32)
        call: dict[str, object] = {"candidate_ids": torch.as_tensor(rng.integers(0, 4, size=nc))}
        if with_p:
            call["candidate_sampling_probability"] = torch.as_tensor(rng.uniform(0, 1, size=nc), dtype=torch.float32)
        if with_w:
            call["sample_weight"] = torch.as_tensor(rng.uniform(0, 2, size=nq), dtype=torch.float32)
        if with_mask:
            call["score_mask"] = torch.as_tensor(rng.uniform(size=(nq, nc)) > 0.3)
        results = []
        for fused in (True, False):
            queries, candidates = base_q.clone().requires_grad_(True), base_c.clone().requires_grad_(True)
            task = Retrieval(temperature=temperature, remove_accidental_hits=remove, fused=fused)
            loss = task(queries, candidates, **call)  # type: ignore[arg-type]
            loss.backward()
            assert queries.grad is not None
            assert candidates.grad is not None
            results.append((float(loss), queries.grad.clone(), candidates.grad.clone()))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-5)
        _check(Retrieval(temperature=temperature, remove_accidental_hits=remove), base_q, base_c, **call)

    @pytest.mark.parametrize("block_rows", [2, None])
    @pytest.mark.parametrize("with_mask", [True, False])
    @pytest.mark.parametrize("mode", BLOCKED_LOSS_MODES)
    def test_gradcheck_blocked_with_all_options(
        self, block_rows: int | None, with_mask: bool, mode: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Several blocks (one partial) or one; the gradients computed in the forward (gradcheck's one-hot
        upstream gradients are unequal across rows: the candidates' side is recomputed), or from exponentials
        the forward kept (without a mask through the thin factors only), or, above the kept budget, recomputed
        in the backward."""
        from twotower.losses import in_batch_softmax_cross_entropy

        _blocked_loss_mode(monkeypatch, mode)

        generator = torch.Generator().manual_seed(9)
        queries = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
        candidates = torch.randn(8, 3, dtype=torch.float64, generator=generator, requires_grad=True)
        bias = torch.rand(8, dtype=torch.float64, generator=generator)
        codes = torch.tensor([0, 1, 2, 0, 4, 1, 6, 7])
        mask = torch.rand(5, 8, generator=generator) > 0.2
        # A masked positive makes the loss ~3.4e36, whose finite differences vanish in float64: keep positives.
        mask[torch.arange(5), torch.arange(5)] = True
        score_mask = mask if with_mask else None

        def per_row(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return in_batch_softmax_cross_entropy(q, c, 0.7, bias, codes, score_mask, block_rows=block_rows)

        assert torch.autograd.gradcheck(per_row, (queries, candidates), eps=1e-6, atol=1e-6)
        logits, labels = reference_logits(
            queries.detach().numpy(), candidates.detach().numpy(), 0.7, np.exp(-bias.numpy()), codes.tolist(),
            True, mask.numpy() if with_mask else None,
        )  # fmt: skip
        expected = [reference_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(5)]
        np.testing.assert_allclose(per_row(queries, candidates).detach().numpy(), expected, rtol=1e-9)

    @pytest.mark.parametrize("native_kernel", [True, False])
    def test_single_block_at_vector_widths(self, native_kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """The single block's row statistics come from the native kernel where it is built, else from torch:
        both must give float64's loss and gradients, at widths that take the kernel's vector lanes and its tail,
        with masked entries, a temperature that makes wide logits, and extra candidates."""
        from twotower import _native
        from twotower.losses import in_batch_softmax_cross_entropy

        if not native_kernel:
            monkeypatch.setattr(_native, "softmax_rows", lambda logits: None)
        elif _native.softmax_rows(torch.zeros(1, 16)) is None:
            pytest.skip("the vectorised softmax kernel is not built on this machine")
        generator = torch.Generator().manual_seed(21)
        queries = torch.randn(40, 8, generator=generator, requires_grad=True)
        candidates = torch.randn(53, 8, generator=generator, requires_grad=True)
        bias = torch.rand(53, generator=generator)
        mask = torch.rand(40, 53, generator=generator) > 0.2
        weights = torch.rand(40, generator=generator)
        per_row = in_batch_softmax_cross_entropy(queries, candidates, 0.1, bias, score_mask=mask)
        (per_row * weights).sum().backward()
        q64 = queries.detach().double().requires_grad_(True)
        c64 = candidates.detach().double().requires_grad_(True)
        logits = q64 @ c64.T / 0.1 + bias.double()
        logits = torch.where(mask, logits, torch.full_like(logits, float(MIN_FLOAT)))
        expected = torch.nn.functional.cross_entropy(logits, torch.arange(40), reduction="none")
        (expected * weights.double()).sum().backward()
        assert q64.grad is not None
        assert c64.grad is not None
        torch.testing.assert_close(per_row.detach().double(), expected.detach(), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(queries.grad, q64.grad.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(candidates.grad, c64.grad.float(), rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("block_rows", [None, 4])
    def test_backward_twice_with_retained_graph(self, block_rows: int | None) -> None:
        """The backward reuses the forward's kept exponentials (of one block or several): a second backward must
        see them intact."""
        from twotower.losses import in_batch_softmax_cross_entropy

        generator = torch.Generator().manual_seed(3)
        queries = torch.randn(6, 4, generator=generator, requires_grad=True)
        candidates = torch.randn(9, 4, generator=generator, requires_grad=True)
        mask = torch.rand(6, 9, generator=generator) > 0.3
        for score_mask in (None, mask):
            loss = in_batch_softmax_cross_entropy(
                queries, candidates, 0.5, score_mask=score_mask, block_rows=block_rows
            ).sum()
            first = torch.autograd.grad(loss, (queries, candidates), retain_graph=True)
            second = torch.autograd.grad(loss, (queries, candidates))
            for a, b in zip(first, second, strict=True):
                assert torch.equal(a, b)
            # Independent check of the first: the materialised softmax cross-entropy's gradient.
            logits = queries @ candidates.T / 0.5
            if score_mask is not None:
                logits = torch.where(score_mask, logits, torch.full_like(logits, MIN_FLOAT))
            expected = torch.autograd.grad(
                torch.nn.functional.cross_entropy(logits, torch.arange(6), reduction="sum"), (queries, candidates)
            )
            for a, b in zip(first, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("native_kernels", [True, False])
    @pytest.mark.parametrize("mode", BLOCKED_LOSS_MODES)
    @pytest.mark.parametrize("with_mask", [True, False])
    @pytest.mark.parametrize("equal_weights", [True, False])
    def test_several_blocks_at_vector_widths_match_float64(
        self, mode: str, with_mask: bool, native_kernels: bool, equal_weights: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Several blocks (the last partial) at widths that take the native kernels' vector lanes and tails, the
        gradients computed in the forward (with equal row weights only scaled in the backward, with unequal
        ones the candidates' side recomputed), from kept exponentials or recomputed (the one-pass gradient
        kernel, or torch's passes without the kernels): float64's loss and gradients, with a temperature, logQ
        bias, accidental hits, masked entries and extra candidates."""
        _blocked_loss_mode(monkeypatch, mode, native_kernels)
        generator = torch.Generator().manual_seed(23)
        queries = torch.randn(37, 8, generator=generator, requires_grad=True)
        candidates = torch.randn(51, 8, generator=generator, requires_grad=True)
        bias = torch.rand(51, generator=generator)
        codes = torch.randint(0, 30, (51,), generator=generator)
        mask = (torch.rand(37, 51, generator=generator) > 0.2) if with_mask else None
        if mask is not None:
            mask[torch.arange(37), torch.arange(37)] = True
        weights = torch.full((37,), 0.37) if equal_weights else torch.rand(37, generator=generator)
        per_row = in_batch_softmax_cross_entropy(queries, candidates, 0.2, bias, codes, mask, block_rows=8)
        (per_row * weights).sum().backward()
        logits, _ = reference_logits(
            queries.detach().double().numpy(), candidates.detach().double().numpy(), 0.2,
            np.exp(-bias.double().numpy()), codes.tolist(), True, None if mask is None else mask.numpy(),
        )  # fmt: skip
        # Gradients through float64 autograd of numpy's logits: the removals are constants added to the scores
        # (a removed entry's softmax weight is 0, so its gradient is 0 either way).
        q64 = queries.detach().double().requires_grad_(True)
        c64 = candidates.detach().double().requires_grad_(True)
        scores = q64 @ c64.T / 0.2 + bias.double()
        removals = torch.from_numpy(logits) - scores.detach()
        expected = torch.nn.functional.cross_entropy(scores + removals, torch.arange(37), reduction="none")
        (expected * weights.double()).sum().backward()
        torch.testing.assert_close(per_row.detach().double(), expected.detach(), rtol=2e-5, atol=1e-5)
        assert q64.grad is not None
        assert c64.grad is not None
        torch.testing.assert_close(queries.grad, q64.grad.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(candidates.grad, c64.grad.float(), rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("with_mask", [True, False])
    def test_eager_gradients_serve_every_upstream_gradient_of_one_forward(self, with_mask: bool) -> None:
        """The forward's gradients for unit row weights are only read by the backward: backwards with equal
        weights, unequal weights and equal weights again (retained graph) each give float64's gradients."""
        from twotower.losses import in_batch_softmax_cross_entropy

        generator = torch.Generator().manual_seed(41)
        queries = torch.randn(19, 8, generator=generator, requires_grad=True)
        candidates = torch.randn(23, 8, generator=generator, requires_grad=True)
        mask = (torch.rand(19, 23, generator=generator) > 0.25) if with_mask else None
        per_row = in_batch_softmax_cross_entropy(queries, candidates, 0.5, score_mask=mask, block_rows=4)
        q64 = queries.detach().double().requires_grad_(True)
        c64 = candidates.detach().double().requires_grad_(True)
        logits = q64 @ c64.T / 0.5
        if mask is not None:
            logits = torch.where(mask, logits, torch.full_like(logits, float(MIN_FLOAT)))
        expected_rows = torch.nn.functional.cross_entropy(logits, torch.arange(19), reduction="none")
        upstream = (torch.ones(19), torch.rand(19, generator=generator), torch.full((19,), 2.5))
        for weights in upstream:
            got = torch.autograd.grad(per_row, (queries, candidates), weights, retain_graph=True)
            want = torch.autograd.grad(expected_rows, (q64, c64), weights.double(), retain_graph=True)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("which", ["queries", "candidates"])
    def test_eager_gradients_of_one_input_alone(self, which: str) -> None:
        """Only one side requires gradient (a frozen tower): its gradient is float64's, the other gets none."""
        from twotower.losses import in_batch_softmax_cross_entropy

        generator = torch.Generator().manual_seed(43)
        queries = torch.randn(10, 6, generator=generator)
        candidates = torch.randn(14, 6, generator=generator)
        (queries if which == "queries" else candidates).requires_grad_(True)
        weights = torch.rand(10, generator=generator)
        (in_batch_softmax_cross_entropy(queries, candidates, block_rows=3) * weights).sum().backward()
        q64 = queries.detach().double().requires_grad_(True)
        c64 = candidates.detach().double().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(q64 @ c64.T, torch.arange(10), reduction="none")
        (expected * weights.double()).sum().backward()
        learned, frozen = (queries, candidates) if which == "queries" else (candidates, queries)
        reference = q64.grad if which == "queries" else c64.grad
        assert learned.grad is not None
        assert reference is not None
        torch.testing.assert_close(learned.grad.double(), reference, rtol=1e-4, atol=1e-5)
        assert frozen.grad is None

    def test_no_gradient_products_without_gradients(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under no_grad (evaluation) the forward computes the loss alone: the eager forward, which also forms
        the gradient products, is not entered, and the loss is float64's."""
        from twotower import losses

        def refuse(*args: object) -> None:
            raise AssertionError("the eager forward ran without gradients")

        generator = torch.Generator().manual_seed(45)
        queries = torch.randn(9, 5, generator=generator, requires_grad=True)
        candidates = torch.randn(9, 5, generator=generator, requires_grad=True)
        monkeypatch.setattr(losses._InBatchSoftmax, "_forward_eager", staticmethod(refuse))
        with torch.no_grad():
            per_row = losses.in_batch_softmax_cross_entropy(queries, candidates)
        expected = torch.nn.functional.cross_entropy(
            queries.detach().double() @ candidates.detach().double().T, torch.arange(9), reduction="none"
        )
        torch.testing.assert_close(per_row.double(), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(AssertionError, match="eager forward ran"):
            losses.in_batch_softmax_cross_entropy(queries, candidates)

    @pytest.mark.parametrize("native_kernels", [True, False])
    @pytest.mark.parametrize("kept", [True, False])
    @pytest.mark.parametrize("block_rows", [None, 16])
    def test_bf16_products_stay_within_bf16_error_of_float64(
        self, kept: bool, block_rows: int | None, native_kernels: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """precision="bf16": the loss and its gradients within bf16's rounding (2**-8 relative, on logits of
        magnitude up to ~10) of float64's, one block or several, kept or recomputed, with or without the native
        kernels."""
        from twotower.logits import LogitSteps

        _blocked_loss_mode(monkeypatch, "kept" if kept else "recomputed", native_kernels)
        generator = torch.Generator().manual_seed(31)
        queries = torch.randn(64, 32, generator=generator).div_(2).requires_grad_(True)
        candidates = torch.randn(80, 32, generator=generator).div_(2).requires_grad_(True)
        steps = LogitSteps(temperature=0.5, matmul_dtype=torch.bfloat16)
        per_row = in_batch_softmax_cross_entropy(queries, candidates, steps=steps, block_rows=block_rows)
        per_row.sum().backward()
        q64 = queries.detach().double().requires_grad_(True)
        c64 = candidates.detach().double().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(q64 @ c64.T / 0.5, torch.arange(64), reduction="none")
        expected.sum().backward()
        assert q64.grad is not None
        assert c64.grad is not None
        error = (per_row.detach().double() - expected.detach()).abs().max()
        assert 0 < error < 0.1  # bf16 rounding shows (float32 would be ~1e-6) and stays small
        for grad, reference in ((queries.grad, q64.grad), (candidates.grad, c64.grad)):
            assert grad is not None
            relative = (grad.double() - reference).norm() / reference.norm()
            assert relative < 3e-2

    def test_precision_bf16_rounds_the_products_and_float32_does_not(self) -> None:
        """compute_logits with precision="bf16" gives float32 logits that are bf16 values (the product ran in
        bf16, then was widened); "float32" keeps float32's; None follows a bf16 autocast region."""
        generator = torch.Generator().manual_seed(5)
        queries, candidates = torch.randn(12, 16, generator=generator), torch.randn(12, 16, generator=generator)

        def is_bf16_valued(logits: torch.Tensor) -> bool:
            return logits.dtype == torch.float32 and torch.equal(logits.bfloat16().float(), logits)

        bf16_logits, _ = Retrieval(precision="bf16").compute_logits(queries, candidates)
        float_logits, _ = Retrieval(precision="float32").compute_logits(queries, candidates)
        assert is_bf16_valued(bf16_logits)
        assert not is_bf16_valued(float_logits)
        expected = queries.double() @ candidates.double().T
        torch.testing.assert_close(float_logits.double(), expected, rtol=1e-5, atol=1e-5)
        # The product of the bf16-rounded embeddings, accumulated in float32 and rounded once to bf16 (half an
        # ulp, 2**-9 relative).
        rounded = queries.bfloat16().double() @ candidates.bfloat16().double().T
        torch.testing.assert_close(bf16_logits.double(), rounded, rtol=2**-8, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            followed, _ = Retrieval().compute_logits(queries, candidates)
            kept_float, _ = Retrieval(precision="float32").compute_logits(queries, candidates)
        assert is_bf16_valued(followed)
        assert not is_bf16_valued(kept_float)
        assert not is_bf16_valued(Retrieval().compute_logits(queries, candidates)[0])

    def test_precision_bf16_loss_under_autocast_equals_explicit(self) -> None:
        """The task's loss inside a bf16 autocast region (precision=None) is the explicit precision="bf16" loss,
        on the blocked and on the materialised path, and not the float32 one."""
        generator = torch.Generator().manual_seed(6)
        queries, candidates = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
        for fused in (True, False):
            explicit = Retrieval(precision="bf16", fused=fused)(queries, candidates)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                followed = Retrieval(fused=fused)(queries, candidates)
            plain = Retrieval(fused=fused)(queries, candidates)
            assert followed.dtype == torch.float32
            torch.testing.assert_close(followed, explicit, rtol=1e-6, atol=1e-5)
            assert not torch.allclose(plain, explicit, rtol=1e-6, atol=1e-6)

    def test_precision_must_be_known(self) -> None:
        with pytest.raises(ValueError, match="precision must be 'float32', 'bf16' or None, got 'fp16'"):
            Retrieval(precision="fp16")  # type: ignore[arg-type]

    def test_batch_metrics_use_the_materialised_logits(self) -> None:
        queries, candidates = _random(4, 4)
        accuracy = BatchTopKAccuracy()
        task = Retrieval(batch_metrics=[accuracy])
        task(queries, candidates)
        assert float(accuracy.total_weight) == 4.0
        task(queries, candidates, compute_batch_metrics=False)
        assert float(accuracy.total_weight) == 4.0
