"""Several gloo processes against one process on the concatenated global batch: loss, gradients, top-K, fit."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distributed_worker import EXTRAS_PER_RANK, fit_case, run
from twotower import BruteForce, FactorizedTopK, Retrieval

OPTIONS = [
    {"temperature": temperature, "num_hard_negatives": hard, "remove_accidental_hits": remove, "reduction": reduction}
    for temperature, hard, remove, reduction in itertools.product(
        [None, 0.3], [None, 3], [False, True], ["sum", "mean"]
    )
]


def _cases(world: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(world)
    task_cases = []
    for number, options in enumerate(OPTIONS):
        nq, extras = 10, EXTRAS_PER_RANK * world
        with_p, with_w = number % 2 == 0, number % 3 != 0
        task_cases.append(
            {
                "options": options,
                "queries": torch.randn(nq, 4, generator=generator),
                "positives": torch.randn(nq, 4, generator=generator),
                "extras": torch.randn(extras, 4, generator=generator),
                # Few distinct ids: accidental hits occur across ranks and among extras.
                "ids": (
                    torch.randint(0, 5, (nq,), generator=generator),
                    torch.randint(0, 5, (extras,), generator=generator),
                ),
                "probability": (torch.rand(nq, generator=generator), torch.rand(extras, generator=generator))
                if with_p
                else None,
                "weights": torch.rand(nq, generator=generator) * 2 if with_w else None,
            }
        )
    corpus = torch.randint(-3, 4, (53, 3), generator=generator).float()
    queries = torch.randint(-3, 4, (11, 3), generator=generator).float()
    true_rows = torch.randint(0, 53, (11,), generator=generator)
    topk = {
        "corpus": corpus,
        "ids": torch.arange(53) * 10 + 7,
        "queries": queries,
        "k": 7,
        "exclusions": torch.randint(0, 53, (11, 4), generator=generator) * 10 + 7,
        "true": corpus[true_rows],
        "true_ids": true_rows * 10 + 7,
    }
    fit = {
        "users": torch.randint(0, 60, (300,), generator=generator),
        "items": torch.randint(0, 40, (300,), generator=generator),
    }
    return {"task": task_cases, "topk": topk, "fit": fit}


def _single_process(case: dict[str, Any]) -> dict[str, Any]:
    queries = case["queries"].clone().requires_grad_(True)
    candidates = torch.cat([case["positives"], case["extras"]]).clone().requires_grad_(True)
    call: dict[str, Any] = {"candidate_ids": torch.cat(case["ids"])}
    if case["probability"] is not None:
        call["candidate_sampling_probability"] = torch.cat(case["probability"])
    if case["weights"] is not None:
        call["sample_weight"] = case["weights"]
    loss = Retrieval(**case["options"])(queries, candidates, **call)
    loss.backward()
    assert queries.grad is not None
    assert candidates.grad is not None
    nq = queries.shape[0]
    return {
        "loss": float(loss),
        "queries": queries.grad,
        "positives": candidates.grad[:nq],
        "extras": candidates.grad[nq:],
    }


def _shares(rows: int, world: int) -> list[slice]:
    base, extra = divmod(rows, world)
    starts = [rank * base + min(rank, extra) for rank in range(world + 1)]
    return [slice(starts[rank], starts[rank + 1]) for rank in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_multi_process_equals_single_process(world: int, tmp_path: Path) -> None:
    cases = _cases(world)
    # A log of 23 row groups of 100 rows (the last 30) for the ranks to stream: batches of 60 rows globally.
    pq.write_table(pa.table({"ts": np.arange(2230)}), tmp_path / "log.parquet", row_group_size=100)
    cases["stream"] = {"path": str(tmp_path / "log.parquet"), "batch_size": 60}
    results = run(world, cases, tmp_path)
    for case, got in zip(cases["task"], results["task"], strict=True):
        expected = _single_process(case)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), case["options"]
        for name in ("queries", "positives", "extras"):
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{name} {case['options']}")

    topk = cases["topk"]
    single = BruteForce().index(topk["corpus"], topk["ids"])
    scores, ids = single(topk["queries"], k=topk["k"])
    assert torch.equal(results["topk"]["scores"], scores)
    assert torch.equal(results["topk"]["ids"], ids)
    excluded_scores, excluded_ids = single.query_with_exclusions(topk["queries"], topk["exclusions"], k=topk["k"])
    assert torch.equal(results["topk"]["excluded_scores"], excluded_scores)
    assert torch.equal(results["topk"]["excluded_ids"], excluded_ids)
    metric = FactorizedTopK(single, ks=(1, 3, 10))
    metric.update(topk["queries"], topk["true"], topk["true_ids"])
    assert results["topk"]["metric"] == metric.results()

    # Streaming: every rank reads its own row groups (no row twice), takes the same number of steps, each of its
    # share of the global batch; what is left out is less than one row group per rank.
    ranks = results["stream"]["ranks"]
    rows = [row for rank in ranks for row in rank["rows"]]
    assert len(rows) == len(set(rows))
    assert set(rows) <= set(range(2230))
    assert len({len(rank["sizes"]) for rank in ranks}) == 1
    assert [set(rank["sizes"]) for rank in ranks] == [{len(range(60)[shard])} for shard in _shares(60, world)]
    assert 2230 - len(rows) < 100 * world + 60

    reference = fit_case(cases["fit"])
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(results["fit"]["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for got_row, expected_row in zip(results["fit"]["history"], reference["history"], strict=True):
        assert got_row["loss"] == pytest.approx(expected_row["loss"], rel=1e-5)
