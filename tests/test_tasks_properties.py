"""Property-based: random shapes and options never crash except with documented errors, and the loss is finite."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import reference_logits, reference_loss
from twotower import BatchAUC, BatchTopKAccuracy, LossMean, Retrieval


@st.composite
def retrieval_inputs(draw: st.DrawFn) -> dict[str, object]:
    nq = draw(st.integers(1, 6))
    nc = draw(st.integers(nq, nq + 5))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    case: dict[str, object] = {
        "queries": torch.as_tensor(rng.normal(size=(nq, d)) * scale, dtype=torch.float32),
        "candidates": torch.as_tensor(rng.normal(size=(nc, d)) * scale, dtype=torch.float32),
        "temperature": draw(st.one_of(st.none(), st.floats(0.05, 10.0))),
        "num_hard_negatives": draw(st.one_of(st.none(), st.integers(-2, nc + 2))),
        "remove_accidental_hits": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["sum", "mean"])),
        "candidate_ids": torch.as_tensor(rng.integers(0, max(1, nc // 2), size=nc)),
    }
    if draw(st.booleans()):
        case["sample_weight"] = torch.as_tensor(rng.uniform(0, 3, size=nq), dtype=torch.float32)
    if draw(st.booleans()):
        probability = rng.uniform(0, 1, size=nc)
        probability[rng.uniform(size=nc) < 0.2] = 0.0
        case["candidate_sampling_probability"] = torch.as_tensor(probability, dtype=torch.float32)
    if draw(st.booleans()):
        case["score_mask"] = torch.as_tensor(rng.uniform(size=(nq, nc)) > 0.3)
    return case


@settings(max_examples=300, deadline=None)
@given(retrieval_inputs())
def test_loss_is_finite_and_equals_reference(case: dict[str, object]) -> None:
    task = Retrieval(
        temperature=case["temperature"],  # type: ignore[arg-type]
        num_hard_negatives=case["num_hard_negatives"],  # type: ignore[arg-type]
        remove_accidental_hits=case["remove_accidental_hits"],  # type: ignore[arg-type]
        reduction=case["reduction"],  # type: ignore[arg-type]
        batch_metrics=[BatchTopKAccuracy(), BatchAUC()],
        loss_metrics=[LossMean()],
    )
    queries = case["queries"].clone().requires_grad_(True)  # type: ignore[attr-defined]
    candidates = case["candidates"].clone().requires_grad_(True)  # type: ignore[attr-defined]
    loss = task(
        queries,
        candidates,
        sample_weight=case.get("sample_weight"),
        candidate_sampling_probability=case.get("candidate_sampling_probability"),
        candidate_ids=case["candidate_ids"],
        score_mask=case.get("score_mask"),
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(queries.grad).all()
    assert torch.isfinite(candidates.grad).all()
    assert all(np.isfinite(value) for value in task.metric_results().values())
    logits, labels = reference_logits(
        case["queries"].numpy(),  # type: ignore[attr-defined]
        case["candidates"].numpy(),  # type: ignore[attr-defined]
        case["temperature"],  # type: ignore[arg-type]
        None if "candidate_sampling_probability" not in case else case["candidate_sampling_probability"].numpy(),  # type: ignore[attr-defined]
        case["candidate_ids"].tolist(),  # type: ignore[attr-defined]
        case["remove_accidental_hits"],  # type: ignore[arg-type]
        None if "score_mask" not in case else case["score_mask"].numpy(),  # type: ignore[attr-defined]
        case["num_hard_negatives"],  # type: ignore[arg-type]
    )
    weights = None if "sample_weight" not in case else case["sample_weight"].numpy()  # type: ignore[attr-defined]
    expected = reference_loss(logits, labels, weights, case["reduction"])  # type: ignore[arg-type]
    assert abs(float(loss) - expected) <= 1e-4 * max(1.0, abs(expected))


@settings(max_examples=200, deadline=None)
@given(
    nq=st.integers(0, 4),
    nc=st.integers(0, 6),
    dq=st.integers(1, 4),
    dc=st.integers(1, 4),
    weight_length=st.integers(0, 6),
    ids_length=st.integers(0, 7),
    remove=st.booleans(),
    with_ids=st.booleans(),
)
def test_bad_shapes_raise_documented_errors(
    nq: int, nc: int, dq: int, dc: int, weight_length: int, ids_length: int, remove: bool, with_ids: bool
) -> None:
    task = Retrieval(remove_accidental_hits=remove)
    try:
        loss = task(
            torch.randn(nq, dq),
            torch.randn(nc, dc),
            sample_weight=torch.ones(weight_length),
            candidate_ids=torch.arange(ids_length) if with_ids else None,
        )
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(
            name in message for name in ("query_embeddings", "candidate_embeddings", "sample_weight", "candidate_ids")
        ), message
        return
    # Only well-formed inputs reach here.
    assert dq == dc
    assert 1 <= nq <= nc
    assert weight_length == nq
    assert (not with_ids and not remove) or ids_length == nc
    assert torch.isfinite(loss)
