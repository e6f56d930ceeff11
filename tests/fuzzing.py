"""A fuzzer over twotower's public entry points, shared by tests/test_fuzz.py (a fixed budget in the suite) and
benchmarks/fuzz.py (a long run that prints the table).

Each case is drawn from a seed: valid arguments for one entry point, then, in most cases, exactly one argument
made invalid in one way (a NaN, a wrong shape, dtype or type, an out-of-range value, a trailing NUL ...). The
case's outcome is one of:

* ``correct``: valid input, and the answer equals an independent numpy/float64 computation;
* ``clear error``: invalid input refused with a ``ValueError``/``TypeError`` (or a subclass) whose message names
  the invalid argument;
* ``wrong name``: refused with a ``ValueError``/``TypeError`` that does not name it;
* ``raw error``: any other exception (an ``IndexError``, ``AttributeError``, a FAISS or torch error ...), or a
  valid input refused;
* ``silent wrong``: an invalid input accepted, or a valid input answered wrongly.

A ``crash`` (the process killed by a signal) can only be seen from outside: benchmarks/fuzz.py runs the cases in
child processes and counts them. Nothing here imports pytest.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import twotower
from reference import reference_logits, reference_loss
from twotower.data.movielens import Vocabulary
from twotower.indexes import Faiss, recall_at_k
from twotower.losses import HardNegativeMining, RemoveAccidentalHits, SamplingProbabilityCorrection
from twotower.sampling import (
    CountingEstimator,
    PopularitySampler,
    StreamingFrequencyEstimator,
    UniformSampler,
    mixed_inclusion_probability,
)

OUTCOMES = ("correct", "clear error", "wrong name", "raw error", "silent wrong")


@dataclass
class Case:
    entry: str
    arguments: dict[str, Any]
    #: the argument made invalid, or None for a valid case
    corrupted: str | None = None
    how: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class MismatchError(Exception):
    """Raised by a check when a valid answer does not match the reference."""


# --- corruptions of one value --------------------------------------------------------------------------------


def _float_corruptions(value: np.ndarray, rng: np.random.Generator) -> list[tuple[str, Any]]:
    """Ways to break a float array argument (given as a tensor)."""
    options: list[tuple[str, Any]] = [
        ("list", value.tolist()),
        ("string", "embeddings"),
        ("None-like dict", {"a": 1}),
        ("int dtype", torch.as_tensor(value.astype(np.int64))),
        ("bool dtype", torch.as_tensor(value > 0)),
        ("extra dimension", torch.as_tensor(value[None])),
    ]
    if value.size:
        bad = value.copy()
        bad.flat[rng.integers(bad.size)] = rng.choice([np.nan, np.inf, -np.inf])
        options.append(("non-finite", torch.as_tensor(bad)))
    if value.ndim == 2:
        options.append(("1-D", torch.as_tensor(value[0] if value.shape[0] else value.reshape(-1))))
        options.append(("zero columns", torch.zeros(value.shape[0], 0)))
    return options


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(value, dtype=np.float32))


def _pick(rng: np.random.Generator, options: list[tuple[str, Any]]) -> tuple[str, Any]:
    return options[int(rng.integers(len(options)))]


def _ints(rng: np.random.Generator, name: str) -> list[tuple[str, Any]]:
    """Bad values for a positive-int argument."""
    del name
    return [
        ("zero", 0),
        ("negative", -int(rng.integers(1, 5))),
        ("float", 2.5),
        ("bool", True),
        ("string", "3"),
        ("inf", math.inf),
        ("nan", math.nan),
    ]


# --- entry points --------------------------------------------------------------------------------------------


class Entry:
    """One public entry point: how to draw a case, call it and check the answer."""

    name = ""

    def draw(self, rng: np.random.Generator) -> Case:
        raise NotImplementedError

    def call(self, case: Case) -> Any:
        raise NotImplementedError

    def check(self, case: Case, result: Any) -> None:
        """Raise :class:`MismatchError` if ``result`` is not the reference answer."""


def _corrupt_one(rng: np.random.Generator, case: Case, options: dict[str, list[tuple[str, Any]]]) -> Case:
    """With probability 3/4, replace one argument by one of its bad values."""
    if rng.random() < 0.25 or not options:
        return case
    name = sorted(options)[int(rng.integers(len(options)))]
    if not options[name]:
        return case
    how, value = _pick(rng, options[name])
    case.arguments[name] = value
    case.corrupted, case.how = name, how
    return case


def _corpus(rng: np.random.Generator, n: int, d: int, integer: bool = False) -> np.ndarray:
    if integer:
        return rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    scale = 10.0 ** rng.uniform(-15, 15)
    return (rng.normal(size=(n, d)) * scale).astype(np.float32)


def _ids(rng: np.random.Generator, n: int) -> tuple[str, Any]:
    kind = rng.integers(3)
    if kind == 0:
        return "none", None
    if kind == 1:
        return "int", rng.permutation(10 * n + 5)[:n].astype(np.int64)
    return "str", [f"item-{value}" for value in rng.permutation(10 * n + 5)[:n]]


class IndexQuery(Entry):
    """``index(candidates, identifiers).query_rows(queries, k, exclusions)`` for BruteForce, Streaming, Faiss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"{kind}.query"

    def draw(self, rng: np.random.Generator) -> Case:
        n, d, nq = int(rng.integers(1, 400)), int(rng.integers(1, 12)), int(rng.integers(0, 9))
        corpus = _corpus(rng, n, d)
        queries = (rng.normal(size=(nq, d)) * 10.0 ** rng.uniform(-15, 15)).astype(np.float32)
        id_kind, ids = _ids(rng, n)
        k = int(rng.integers(1, n + 5))
        exclusions = None
        if rng.random() < 0.5:
            known = list(range(n)) if ids is None else list(ids)
            exclusions = [
                [known[int(j)] for j in rng.integers(0, n, size=rng.integers(0, min(n, 8) + 1))]
                + ([-7] if id_kind != "str" else ["unknown"])
                for _ in range(nq)
            ]
        arguments = {
            "candidates": _tensor(corpus),
            "identifiers": ids,
            "queries": _tensor(queries),
            "k": k,
            "exclusions": exclusions,
        }
        case = Case(self.name, arguments)
        bad_ids: list[tuple[str, Any]] = [
            ("wrong length", np.arange(n + 1)),
            ("2-D", np.arange(n)[:, None].repeat(2, 1)),
            ("floats", torch.rand(n)),
            ("mixed", [1, "a"] * (n // 2) + [1] * (n % 2)),
        ]
        if n >= 1:
            bad_ids.append(("trailing NUL", [f"item{j}" + ("\x00" if j == 0 else "") for j in range(n)]))
        wrong_d = _tensor(rng.normal(size=(max(nq, 1), d + 1)))
        options = {
            "candidates": [*_float_corruptions(corpus, rng), ("empty", torch.zeros(0, d))],
            "identifiers": bad_ids,
            "queries": [option for option in _float_corruptions(queries, rng) if option[0] != "zero columns"]
            + [("wrong dimension", wrong_d)],
            "k": _ints(rng, "k"),
        }
        if exclusions is not None:
            other_kind = [["a"]] * nq if id_kind != "str" else [[1]] * nq
            options["exclusions"] = [
                ("wrong row count", [*exclusions, [1]]),
                ("a string", "item"),
                ("other id kind", other_kind) if nq else ("a string", "item"),
                ("float ids", [[0.5]] * nq) if nq else ("a string", "item"),
            ]
        if self.kind == "Faiss" and n < 64:
            options["factory"] = [("more cells than rows", "IVF64,Flat")]
        case.arguments["factory"] = "Flat" if self.kind == "Faiss" else None
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        arguments = case.arguments
        if self.kind == "BruteForce":
            index: twotower.TopK = twotower.BruteForce()
        elif self.kind == "Streaming":
            index = twotower.Streaming()
        else:
            index = Faiss(arguments["factory"], train_size=10_000)
        index.index(arguments["candidates"], arguments["identifiers"])
        return index.query_rows(arguments["queries"], arguments["k"], arguments["exclusions"])

    def check(self, case: Case, result: Any) -> None:
        scores, ids, rows = result
        arguments = case.arguments
        corpus = arguments["candidates"].numpy().astype(np.float64)
        queries = arguments["queries"].numpy().astype(np.float64)
        n = corpus.shape[0]
        k = min(int(arguments["k"]), n)
        identifiers = np.arange(n) if arguments["identifiers"] is None else np.asarray(arguments["identifiers"])
        if tuple(rows.shape) != (queries.shape[0], k):
            raise MismatchError(f"shape {tuple(rows.shape)}, expected {(queries.shape[0], k)}")
        truth = queries @ corpus.T
        tolerance = 4 * corpus.shape[1] * 2.0**-24 * np.linalg.norm(queries, axis=1)[:, None]
        tolerance = tolerance * np.linalg.norm(corpus, axis=1).max() + 1e-300
        scores_np, rows_np = scores.numpy().astype(np.float64), rows.numpy()
        for i in range(queries.shape[0]):
            excluded = set()
            if arguments["exclusions"] is not None:
                wanted = {str(value) for value in arguments["exclusions"][i]}
                excluded = {j for j in range(n) if str(identifiers[j]) in wanted}
            allowed = [j for j in range(n) if j not in excluded]
            filled = min(k, len(allowed))
            got = rows_np[i]
            if (got[:filled] < 0).any() or (got[filled:] >= 0).any() or len(set(got[:filled].tolist())) != filled:
                raise MismatchError(f"row {i}: slots {got.tolist()}, {filled} expected filled")
            if excluded & set(got[:filled].tolist()):
                raise MismatchError(f"row {i}: an excluded row came back")
            if filled:
                kth = np.sort(truth[i, allowed])[::-1][filled - 1]
                if truth[i, got[:filled]].min() < kth - tolerance[i, 0]:
                    raise MismatchError(f"row {i}: a candidate outside the true top {filled}")
                expected = truth[i, got[:filled]]
                with np.errstate(over="ignore"):
                    rounded = expected.astype(np.float32).astype(np.float64)
                close = np.abs(scores_np[i, :filled] - rounded) <= tolerance[i, 0] + 2.0**-120 + 1e-6 * np.abs(rounded)
                same_inf = np.isinf(rounded) & (scores_np[i, :filled] == rounded)
                if not (close | same_inf).all():
                    raise MismatchError(f"row {i}: scores {scores_np[i, :filled]} vs {rounded}")
            ids_np = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            if filled and [str(v) for v in ids_np[i, :filled]] != [str(identifiers[j]) for j in got[:filled]]:
                raise MismatchError(f"row {i}: ids do not match the rows")


class RetrievalCall(Entry):
    """``Retrieval(...)(query_embeddings, candidate_embeddings, ...)``: the loss against numpy."""

    name = "Retrieval"

    def draw(self, rng: np.random.Generator) -> Case:
        nq = int(rng.integers(1, 10))
        nc, d = nq + int(rng.integers(0, 5)), int(rng.integers(1, 7))
        q, c = rng.normal(size=(nq, d)).astype(np.float32), rng.normal(size=(nc, d)).astype(np.float32)
        arguments: dict[str, Any] = {"query_embeddings": _tensor(q), "candidate_embeddings": _tensor(c)}
        if rng.random() < 0.5:
            arguments["sample_weight"] = torch.as_tensor(rng.uniform(0, 2, size=nq), dtype=torch.float32)
        if rng.random() < 0.5:
            arguments["candidate_sampling_probability"] = torch.as_tensor(
                rng.uniform(0, 1, size=nc), dtype=torch.float32
            )
        remove = bool(rng.random() < 0.5)
        if remove or rng.random() < 0.3:
            arguments["candidate_ids"] = torch.as_tensor(rng.integers(0, 4, size=nc))
        if rng.random() < 0.4:
            arguments["score_mask"] = torch.as_tensor(rng.uniform(size=(nq, nc)) > 0.3)
        settings = {
            "temperature": float(rng.choice([0.1, 0.5, 1.0])) if rng.random() < 0.5 else None,
            "remove_accidental_hits": remove,
            "fused": bool(rng.random() < 0.5),
            "reduction": str(rng.choice(["sum", "mean"])),
        }
        case = Case(self.name, arguments, extra=settings)
        options: dict[str, list[tuple[str, Any]]] = {
            # (an extra leading dimension is valid here: [nq, heads, d] multi-head queries)
            "query_embeddings": [o for o in _float_corruptions(q, rng) if o[0] != "extra dimension"]
            + [("wrong dimension", _tensor(rng.normal(size=(nq, d + 1))))],
            "candidate_embeddings": [o for o in _float_corruptions(c, rng) if o[0] != "zero columns"]
            + [("fewer rows than queries", _tensor(c[: nq - 1])) if nq > 1 else ("string", "c")],
            "sample_weight": [
                ("negative", -torch.ones(nq)),
                ("nan", torch.full((nq,), math.nan)),
                ("wrong length", torch.ones(nq + 1)),
                ("string", "w"),
            ],
            "candidate_sampling_probability": [
                ("above 1", torch.full((nc,), 1.5)),
                ("negative", -torch.ones(nc)),
                ("nan", torch.full((nc,), math.nan)),
                ("wrong length", torch.ones(nc + 2)),
            ],
            "candidate_ids": [
                ("wrong length", torch.arange(nc + 1)),
                ("floats", torch.rand(nc)),
                ("2-D", torch.zeros(nc, 2, dtype=torch.int64)),
            ],
            "score_mask": [("not bool", torch.ones(nq, nc)), ("wrong shape", torch.ones(nq, nc + 1, dtype=torch.bool))],
            "temperature": [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf), ("string", "t")],
        }
        case = _corrupt_one(rng, case, options)
        if case.corrupted == "temperature":
            case.extra["temperature"] = case.arguments.pop("temperature")
        return case

    def call(self, case: Case) -> Any:
        task = twotower.Retrieval(**case.extra)
        return task(**case.arguments, compute_metrics=False)

    def check(self, case: Case, result: Any) -> None:
        arguments, extra = case.arguments, case.extra
        ids = arguments.get("candidate_ids")
        logits, labels = reference_logits(
            arguments["query_embeddings"].numpy(),
            arguments["candidate_embeddings"].numpy(),
            extra["temperature"],
            None
            if "candidate_sampling_probability" not in arguments
            else arguments["candidate_sampling_probability"].numpy(),
            None if ids is None else ids.tolist(),
            extra["remove_accidental_hits"],
            None if "score_mask" not in arguments else arguments["score_mask"].numpy(),
        )
        weights = arguments.get("sample_weight")
        expected = reference_loss(logits, labels, None if weights is None else weights.numpy(), extra["reduction"])
        if not math.isclose(float(result), expected, rel_tol=1e-4, abs_tol=1e-4):
            raise MismatchError(f"loss {float(result)} vs {expected}")


class FactorizedTopKUpdate(Entry):
    name = "FactorizedTopK.update"

    def draw(self, rng: np.random.Generator) -> Case:
        n, d, nq = int(rng.integers(1, 200)), int(rng.integers(1, 6)), int(rng.integers(1, 12))
        corpus = _corpus(rng, n, d, integer=True)
        truth_rows = rng.integers(0, n, size=nq)
        queries = rng.integers(-3, 4, size=(nq, d)).astype(np.float32)
        with_ids = bool(rng.random() < 0.5)
        arguments: dict[str, Any] = {
            "query_embeddings": _tensor(queries),
            "true_candidate_embeddings": _tensor(corpus[truth_rows]),
            "true_candidate_ids": torch.as_tensor(truth_rows) if with_ids else None,
        }
        if rng.random() < 0.5:
            arguments["sample_weight"] = torch.as_tensor(rng.uniform(0, 2, size=nq), dtype=torch.float32)
        case = Case(self.name, arguments, extra={"corpus": corpus, "ks": (1, 3, 10)})
        options = {
            "query_embeddings": _float_corruptions(queries, rng),
            "true_candidate_embeddings": [
                ("wrong shape", _tensor(corpus[truth_rows][:, :0])),
                ("nan", torch.full((nq, d), math.nan)),
                ("list", corpus[truth_rows].tolist()),
            ],
            "true_candidate_ids": [("wrong length", torch.arange(nq + 1)), ("strings", [str(v) for v in truth_rows])],
            "sample_weight": [
                ("negative", -torch.ones(nq)),
                ("wrong length", torch.ones(nq + 3)),
                ("nan", torch.full((nq,), math.nan)),
            ],
        }
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        metric = twotower.FactorizedTopK(_tensor(case.extra["corpus"]), ks=case.extra["ks"])
        metric.update(**case.arguments)
        return metric.results()

    def check(self, case: Case, result: Any) -> None:
        corpus = case.extra["corpus"].astype(np.int64)
        queries = case.arguments["query_embeddings"].numpy().astype(np.int64)
        truth = case.arguments["true_candidate_embeddings"].numpy().astype(np.int64)
        ids = case.arguments["true_candidate_ids"]
        weights = case.arguments.get("sample_weight")
        weights = np.ones(queries.shape[0]) if weights is None else weights.numpy().astype(np.float64)
        scores = queries @ corpus.T
        for k in case.extra["ks"]:
            hits = []
            for i in range(queries.shape[0]):
                if ids is None:
                    hits.append(int((scores[i] > int(queries[i] @ truth[i])).sum()) < k)
                else:
                    order = np.lexsort((np.arange(corpus.shape[0]), -scores[i]))[:k]
                    hits.append(int(ids[i]) in set(order.tolist()))
            expected = float(np.sum(weights * hits) / weights.sum()) if weights.sum() > 0 else 0.0
            got = result[f"factorized_top_k/top_{k}_categorical_accuracy"]
            if not math.isclose(got, expected, abs_tol=1e-9):
                raise MismatchError(f"top-{k} {got} vs {expected}")


class CorpusRankingUpdate(Entry):
    name = "CorpusRanking.update"

    def draw(self, rng: np.random.Generator) -> Case:
        n, d, nq = int(rng.integers(4, 150)), int(rng.integers(1, 6)), int(rng.integers(1, 10))
        corpus = _corpus(rng, n, d, integer=True)
        queries = rng.integers(-3, 4, size=(nq, d)).astype(np.float32)
        relevant = [rng.choice(n, size=rng.integers(0, 4), replace=False).tolist() for _ in range(nq)]
        exclusions = [rng.choice(n, size=rng.integers(0, 3), replace=False).tolist() for _ in range(nq)]
        arguments: dict[str, Any] = {
            "query_embeddings": _tensor(queries),
            "relevant_ids": relevant,
            "exclusions": exclusions if rng.random() < 0.5 else None,
        }
        if rng.random() < 0.5:
            arguments["sample_weight"] = torch.as_tensor(rng.uniform(0, 2, size=nq), dtype=torch.float32)
        case = Case(self.name, arguments, extra={"corpus": corpus, "ks": (1, 5)})
        options = {
            "query_embeddings": _float_corruptions(queries, rng),
            "relevant_ids": [("wrong count", [*relevant, [0]]), ("floats", [[0.5]] * nq), ("a string", "abc")],
            "sample_weight": [
                ("wrong length", torch.ones(nq + 2)),
                ("negative", -torch.ones(nq)),
                ("nan", torch.full((nq,), math.nan)),
            ],
            "exclusions": [("wrong count", [[0]] * (nq + 1)), ("strings", [["a"]] * nq)],
        }
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        metric = twotower.CorpusRanking(_tensor(case.extra["corpus"]), ks=case.extra["ks"])
        metric.update(**case.arguments)
        return metric.results()

    def check(self, case: Case, result: Any) -> None:
        corpus = case.extra["corpus"].astype(np.int64)
        queries = case.arguments["query_embeddings"].numpy().astype(np.int64)
        weights = case.arguments.get("sample_weight")
        weights = np.ones(queries.shape[0]) if weights is None else weights.numpy().astype(np.float64)
        exclusions = case.arguments["exclusions"]
        totals: dict[str, float] = {}
        weight_sum = 0.0
        for i in range(queries.shape[0]):
            relevant = set(case.arguments["relevant_ids"][i])
            if not relevant:
                continue
            weight_sum += weights[i]
            excluded = set(exclusions[i]) if exclusions is not None else set()
            scores = queries[i] @ corpus.T
            order = [j for j in np.lexsort((np.arange(corpus.shape[0]), -scores)) if j not in excluded]
            for k in case.extra["ks"]:
                found = sum(1 for j in order[:k] if j in relevant)
                totals[f"corpus/recall@{k}"] = totals.get(f"corpus/recall@{k}", 0.0) + weights[i] * found / len(
                    relevant
                )
                totals[f"corpus/hit_rate@{k}"] = totals.get(f"corpus/hit_rate@{k}", 0.0) + weights[i] * (found > 0)
        for name, total in totals.items():
            expected = total / weight_sum if weight_sum > 0 else 0.0
            if not math.isclose(result[name], expected, abs_tol=1e-9):
                raise MismatchError(f"{name} {result[name]} vs {expected}")


class BatchMetricUpdate(Entry):
    def __init__(self, kind: str) -> None:
        self.kind, self.name = kind, f"{kind}.update"

    def draw(self, rng: np.random.Generator) -> Case:
        nq = int(rng.integers(1, 8))
        nc = nq + int(rng.integers(0, 4))
        logits = rng.integers(-3, 4, size=(nq, nc)).astype(np.float32)
        labels = np.eye(nq, nc, dtype=np.float32)
        arguments: dict[str, Any] = {"labels": _tensor(labels), "logits": _tensor(logits)}
        if rng.random() < 0.5:
            arguments["sample_weight"] = torch.as_tensor(rng.uniform(0.1, 2, size=nq), dtype=torch.float32)
        case = Case(self.name, arguments)
        options = {
            "logits": [
                ("wrong shape", torch.zeros(nq, nc + 1)),
                ("1-D", torch.zeros(nc)),
                ("list", logits.tolist()),
                ("nan", torch.full((nq, nc), math.nan)),
            ],
            "labels": [("wrong shape", torch.zeros(nq + 1, nc)), ("numpy list", labels.tolist())],
            "sample_weight": [("wrong length", torch.ones(nq + 1)), ("negative", -torch.ones(nq))],
        }
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        metric = twotower.BatchTopKAccuracy(k=2) if self.kind == "BatchTopKAccuracy" else twotower.BatchAUC()
        metric.update(**case.arguments)
        return float(metric.value())

    def check(self, case: Case, result: Any) -> None:
        logits = case.arguments["logits"].numpy().astype(np.float64)
        weights = case.arguments.get("sample_weight")
        weights = np.ones(logits.shape[0]) if weights is None else weights.numpy().astype(np.float64)
        values = []
        for i in range(logits.shape[0]):
            positive = logits[i, i]
            others = np.delete(logits[i], i)
            if self.kind == "BatchTopKAccuracy":
                values.append(float((logits[i] > positive).sum() < 2))
            else:
                values.append(((others < positive).sum() + 0.5 * (others == positive).sum()) / max(len(others), 1))
        keep = (
            np.ones(len(values), dtype=bool)
            if self.kind == "BatchTopKAccuracy"
            else np.array([logits.shape[1] > 1] * len(values))
        )
        w = weights[keep]
        expected = float(np.sum(w * np.array(values)[keep]) / w.sum()) if w.sum() > 0 else 0.0
        if not math.isclose(result, expected, abs_tol=1e-9):
            raise MismatchError(f"{result} vs {expected}")


class SamplingCall(Entry):
    """The samplers and estimators of twotower.sampling, against their closed forms."""

    def __init__(self, kind: str) -> None:
        self.kind, self.name = kind, kind

    def draw(self, rng: np.random.Generator) -> Case:
        n = int(rng.integers(1, 50))
        ids = torch.as_tensor(rng.integers(0, n, size=rng.integers(1, 20)))
        if self.kind == "UniformSampler.inclusion":
            arguments: dict[str, Any] = {"num_items": n, "ids": ids, "num_samples": int(rng.integers(1, 30))}
            options = {
                "num_items": _ints(rng, "num_items"),
                "num_samples": _ints(rng, "num_samples"),
                "ids": [
                    ("out of range", torch.tensor([n])),
                    ("negative", torch.tensor([-1])),
                    ("strings", ["a"]),
                    ("floats", torch.rand(3)),
                ],
            }
        elif self.kind == "PopularitySampler.inclusion":
            counts = rng.integers(0, 10, size=n).astype(np.float64)
            counts[0] += 1
            arguments = {
                "counts": counts,
                "alpha": float(rng.uniform(0, 2)),
                "ids": ids,
                "num_samples": int(rng.integers(1, 30)),
            }
            options = {
                "alpha": [("inf", math.inf), ("nan", math.nan), ("negative", -1.0), ("string", "a")],
                "counts": [
                    ("negative", -np.ones(n)),
                    ("nan", np.full(n, np.nan)),
                    ("empty", np.zeros(0)),
                    ("2-D", np.ones((n, 2))),
                    ("strings", ["a"] * n),
                    ("all zero", np.zeros(n)),
                ],
                "ids": [("out of range", torch.tensor([n]))],
                "num_samples": _ints(rng, "num_samples"),
            }
        elif self.kind == "CountingEstimator.probability":
            arguments = {
                "num_items": n,
                "min_count": float(rng.uniform(0.1, 2)),
                "ids": ids,
                "batch_size": int(rng.integers(1, 50)),
            }
            options = {
                "min_count": [("inf", math.inf), ("zero", 0.0), ("nan", math.nan), ("string", "a")],
                "batch_size": _ints(rng, "batch_size"),
                "num_items": _ints(rng, "num_items"),
                "ids": [("out of range", torch.tensor([n])), ("strings", ["x"])],
            }
        elif self.kind == "StreamingFrequencyEstimator.update":
            arguments = {
                "num_buckets": int(rng.integers(1, 100)),
                "alpha": float(rng.uniform(0.01, 1)),
                "initial_gap": float(rng.uniform(1, 50)),
                "ids": ids,
            }
            options = {
                "initial_gap": [("inf", math.inf), ("nan", math.nan), ("below 1", 0.5)],
                "alpha": [("zero", 0.0), ("above 1", 2.0), ("nan", math.nan), ("string", "a")],
                "num_buckets": _ints(rng, "num_buckets"),
                "ids": [("floats", torch.rand(3)), ("strings", ["a"])],
            }
        else:  # mixed_inclusion_probability
            size = int(rng.integers(2, 10))  # sizes 1 and 2 would broadcast with the mismatched shape below
            arguments = {"in_batch": torch.rand(size), "sampled": torch.rand(size)}
            options = {
                "in_batch": [
                    ("above 1", torch.full((size,), 1.5)),
                    ("nan", torch.full((size,), math.nan)),
                    ("list", [0.5] * size),
                    ("mismatched shape", torch.rand(size + 1)),
                ],
                "sampled": [("negative", -torch.ones(size)), ("string", "s")],
            }
        return _corrupt_one(rng, Case(self.name, arguments), options)

    def call(self, case: Case) -> Any:
        a = case.arguments
        if self.kind == "UniformSampler.inclusion":
            return UniformSampler(a["num_items"]).inclusion(a["ids"], a["num_samples"])
        if self.kind == "PopularitySampler.inclusion":
            return PopularitySampler(a["counts"], a["alpha"]).inclusion(a["ids"], a["num_samples"])
        if self.kind == "CountingEstimator.probability":
            estimator = CountingEstimator(a["num_items"], a["min_count"])
            return estimator.probability(a["ids"], a["batch_size"])
        if self.kind == "StreamingFrequencyEstimator.update":
            return StreamingFrequencyEstimator(a["num_buckets"], a["alpha"], a["initial_gap"]).update(a["ids"])
        return mixed_inclusion_probability(a["in_batch"], a["sampled"])

    def check(self, case: Case, result: Any) -> None:
        a = case.arguments
        if self.kind == "UniformSampler.inclusion":
            expected = 1 - (1 - 1 / a["num_items"]) ** a["num_samples"] * np.ones(len(a["ids"]))
        elif self.kind == "PopularitySampler.inclusion":
            weights = a["counts"] ** a["alpha"]
            per_draw = (weights / weights.sum())[a["ids"].numpy()]
            expected = 1 - (1 - per_draw) ** a["num_samples"]
        elif self.kind == "CountingEstimator.probability":
            counts = np.full(a["num_items"], a["min_count"])
            frequency = (counts / counts.sum())[a["ids"].numpy()]
            expected = np.clip(1 - (1 - frequency) ** a["batch_size"], 1e-9, 1)
        elif self.kind == "StreamingFrequencyEstimator.update":
            expected = np.clip(1 / np.full(len(a["ids"]), a["initial_gap"]), 1e-9, 1)
        else:
            expected = np.maximum(1 - (1 - a["in_batch"].numpy()) * (1 - a["sampled"].numpy()), 1e-9)
        if not np.allclose(np.asarray(result, dtype=np.float64), expected, rtol=1e-5, atol=1e-7):
            raise MismatchError(f"{np.asarray(result)} vs {expected}")


class LossLayerCall(Entry):
    """The loss layers of twotower.losses on their own."""

    def __init__(self, kind: str) -> None:
        self.kind, self.name = kind, kind

    def draw(self, rng: np.random.Generator) -> Case:
        nq = int(rng.integers(1, 6))
        nc = nq + int(rng.integers(0, 4))
        logits = torch.as_tensor(rng.normal(size=(nq, nc)), dtype=torch.float32)
        labels = torch.eye(nq, nc)
        if self.kind == "SamplingProbabilityCorrection":
            arguments: dict[str, Any] = {
                "logits": logits,
                "candidate_sampling_probability": torch.rand(nc) * 0.9 + 0.05,
            }
            options = {
                "candidate_sampling_probability": [
                    ("nan", torch.full((nc,), math.nan)),
                    ("wrong length", torch.rand(nc + 1)),
                    ("strings", ["0.5"] * nc),
                ],
                # (lists of numbers are valid: TFRS's layers take them)
                "logits": [("1-D", torch.zeros(nc)), ("ragged list", [[0.0], [0.0, 1.0]])],
            }
        elif self.kind == "RemoveAccidentalHits":
            arguments = {
                "labels": labels,
                "logits": logits,
                "candidate_ids": torch.as_tensor(rng.integers(0, 3, size=nc)),
            }
            options = {
                "candidate_ids": [("wrong length", torch.arange(nc + 1)), ("floats", torch.rand(nc))],
                "labels": [("wrong shape", torch.eye(nq + 1, nc))],
                "logits": [("string", "logits")],
            }
        else:
            arguments = {"logits": logits, "labels": labels}
            options = {
                "labels": [("wrong shape", torch.eye(nq, nc + 1)), ("strings", [["1"] * nc] * nq)],
                "logits": [("1-D", torch.zeros(nc))],
                "num_hard_negatives": [("float", 1.5), ("string", "2")],
            }
            arguments["num_hard_negatives"] = int(rng.integers(1, nc + 1))
        return _corrupt_one(rng, Case(self.name, arguments), options)

    def call(self, case: Case) -> Any:
        a = dict(case.arguments)
        if self.kind == "SamplingProbabilityCorrection":
            return SamplingProbabilityCorrection()(a["logits"], a["candidate_sampling_probability"])
        if self.kind == "RemoveAccidentalHits":
            return RemoveAccidentalHits()(a["labels"], a["logits"], a["candidate_ids"])
        return HardNegativeMining(a.pop("num_hard_negatives"))(a["logits"], a["labels"])

    def check(self, case: Case, result: Any) -> None:
        a = case.arguments
        logits = a["logits"].numpy().astype(np.float64)
        if self.kind == "SamplingProbabilityCorrection":
            expected = logits - np.log(np.clip(a["candidate_sampling_probability"].numpy(), 1e-6, 1))
            got = result.numpy()
        elif self.kind == "RemoveAccidentalHits":
            ids = a["candidate_ids"].numpy()
            expected = logits.copy()
            for i in range(logits.shape[0]):
                for j in range(logits.shape[1]):
                    if j != i and ids[j] == ids[i]:
                        expected[i, j] += float(np.finfo(np.float32).min) / 100
            got = result.numpy()
        else:
            n = a["num_hard_negatives"]
            nc = logits.shape[1]
            if n >= nc - 1:
                expected = logits
            else:
                expected = np.stack(
                    [np.concatenate([[row[i]], np.sort(np.delete(row, i))[::-1][:n]]) for i, row in enumerate(logits)]
                )
            got = result[0].numpy()
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
            raise MismatchError(f"{got} vs {expected}")


class RecallAtK(Entry):
    name = "recall_at_k"

    def draw(self, rng: np.random.Generator) -> Case:
        nq, k = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        truth = rng.integers(0, 20, size=(nq, k))
        found = rng.integers(0, 20, size=(nq, int(rng.integers(1, 8))))
        case = Case(self.name, {"found": torch.as_tensor(found), "truth": torch.as_tensor(truth)})
        options = {
            "found": [("1-D", torch.as_tensor(found[0])), ("wrong rows", torch.zeros(nq + 1, 2))],
            "truth": [("empty rows", torch.zeros(nq, 0)), ("1-D", torch.as_tensor(truth[0]))],
        }
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        return recall_at_k(case.arguments["found"], case.arguments["truth"])

    def check(self, case: Case, result: Any) -> None:
        truth, found = case.arguments["truth"].numpy(), case.arguments["found"].numpy()
        expected = np.mean([len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True)])
        if not math.isclose(result, expected / truth.shape[1]):
            raise MismatchError(f"{result} vs {expected / truth.shape[1]}")


class VocabularyLookup(Entry):
    name = "Vocabulary.lookup"

    def draw(self, rng: np.random.Generator) -> Case:
        values = [f"v{j}" for j in rng.choice(100, size=rng.integers(1, 20), replace=False)]
        asked = [f"v{j}" for j in rng.integers(0, 100, size=rng.integers(0, 10))] + ["v1\x00"]
        case = Case(self.name, {"values": values, "strings": asked})
        options = {"values": [("empty", []), ("trailing NUL", [*values, "v1\x00"])]}
        return _corrupt_one(rng, case, options)

    def call(self, case: Case) -> Any:
        return Vocabulary(case.arguments["values"]).lookup(case.arguments["strings"])

    def check(self, case: Case, result: Any) -> None:
        ordered = sorted(set(case.arguments["values"]))
        expected = [ordered.index(s) + 1 if s in ordered else 0 for s in case.arguments["strings"]]
        if result.tolist() != expected:
            raise MismatchError(f"{result.tolist()} vs {expected}")


class IndexFileLoad(Entry):
    """``BruteForce.load`` / ``Faiss.load`` of a saved index with bytes flipped, cut or appended: refused with a
    ``ValueError`` naming the file, or, where the damage misses everything that matters, answering as the
    original does."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind, self.name, self.directory = kind, f"{kind}.load", directory

    def draw(self, rng: np.random.Generator) -> Case:
        n, d = int(rng.integers(1, 80)), int(rng.integers(1, 8))
        corpus = _tensor(rng.normal(size=(n, d)))
        _, ids = _ids(rng, n)
        index: twotower.TopK = twotower.BruteForce(k=5) if self.kind == "BruteForce" else Faiss("Flat", k=5)
        index.index(corpus, ids)
        path = self.directory / f"{self.kind}-{rng.integers(1 << 62)}.safetensors"
        index.save(path)  # type: ignore[attr-defined]
        data = bytearray(path.read_bytes())
        how = str(rng.choice(["flip", "truncate", "append", "header", "none"]))
        if how == "flip":
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        elif how == "truncate":
            data = data[: int(rng.integers(len(data)))]
        elif how == "append":
            data += bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
        elif how == "header":
            data[:8] = int(rng.integers(0, 1 << 40)).to_bytes(8, "little")
        path.write_bytes(bytes(data))
        queries = _tensor(rng.normal(size=(3, d)))
        return Case(
            self.name,
            {"path": path},
            None if how == "none" else "path",
            how,
            extra={"original": index, "queries": queries},
        )

    def call(self, case: Case) -> Any:
        loader = twotower.BruteForce if self.kind == "BruteForce" else Faiss
        try:
            return loader.load(case.arguments["path"])
        finally:
            case.arguments["path"].unlink(missing_ok=True)

    def check(self, case: Case, result: Any) -> None:
        before = case.extra["original"](case.extra["queries"])
        after = result(case.extra["queries"])
        if not torch.equal(before[0], after[0]) or str(np.asarray(before[1])) != str(np.asarray(after[1])):
            raise MismatchError("a damaged file was loaded and answers differently")


ENTRIES: list[Entry] = [
    IndexQuery("BruteForce"),
    IndexQuery("Streaming"),
    IndexQuery("Faiss"),
    RetrievalCall(),
    FactorizedTopKUpdate(),
    CorpusRankingUpdate(),
    BatchMetricUpdate("BatchTopKAccuracy"),
    BatchMetricUpdate("BatchAUC"),
    SamplingCall("UniformSampler.inclusion"),
    SamplingCall("PopularitySampler.inclusion"),
    SamplingCall("CountingEstimator.probability"),
    SamplingCall("StreamingFrequencyEstimator.update"),
    SamplingCall("mixed_inclusion_probability"),
    LossLayerCall("SamplingProbabilityCorrection"),
    LossLayerCall("RemoveAccidentalHits"),
    LossLayerCall("HardNegativeMining"),
    RecallAtK(),
    VocabularyLookup(),
]


class ServiceRequest(Entry):
    """``POST /recommend`` with a valid or a broken body, through FastAPI's test client: valid bodies get the
    in-process answer (or 404 for an unknown user), broken ones a 4xx naming the field, never a 500."""

    name = "POST /recommend"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            from fastapi.testclient import TestClient

            from twotower.serving import create_app, load_bundle, save_bundle

            torch.manual_seed(0)
            users = Vocabulary([f"u{i}" for i in range(30)])
            index = twotower.BruteForce().index(torch.randn(200, 8), [f"item-{i}" for i in range(200)])
            path = save_bundle(
                self.directory / "bundle", torch.nn.Embedding(len(users), 8), index, users, {"u1": ["item-3"]}
            )
            self.bundle = load_bundle(path)
            self._client = TestClient(create_app(self.bundle), raise_server_exceptions=False)
        return self._client

    def draw(self, rng: np.random.Generator) -> Case:
        body: dict[str, Any] = {"user_id": f"u{int(rng.integers(0, 35))}"}
        if rng.random() < 0.7:
            body["k"] = int(rng.integers(1, 250))
        if rng.random() < 0.5:
            body["exclude"] = [f"item-{int(j)}" for j in rng.integers(0, 220, size=rng.integers(0, 6))]
        if rng.random() < 0.3:
            body["exclude_seen"] = bool(rng.random() < 0.5)
        case = Case(self.name, {"body": json.dumps(body).encode(), "parsed": body})
        options: dict[str, list[tuple[str, Any]]] = {
            "k": [
                ("NaN", "NaN"),
                ("too large", "5000"),
                ("zero", "0"),
                ("string", '"ten"'),
                ("float", "2.5"),
                ("Infinity", "-Infinity"),
                ("huge", "1" + "0" * 400),
                ("null", "null"),
            ],
            "user_id": [
                ("empty", '""'),
                ("too long", json.dumps("u" * 300)),
                ("lone surrogate", '"\\ud800"'),
                ("number", "42"),
                ("list", '["u1"]'),
                ("null", "null"),
            ],
            "exclude": [
                ("not a list", '"item-1"'),
                ("numbers", "[1, 2]"),
                ("too many", json.dumps(["i"] * 10_001)),
                ("lone surrogate", '["\\udfff"]'),
                ("nested", '[["item-1"]]'),
            ],
            "exclude_seen": [("string", '"yes"'), ("number", "2")],
            "body": [
                ("not JSON", "{user_id: u1}"),
                ("an array", '["u1"]'),
                ("deep nesting", "[" * 100_000),
                ("empty", ""),
                ("not UTF-8", "\udcff"),
                ("over 1 MiB", json.dumps({"user_id": "u1", "pad": "x" * (1 << 20)})),
            ],
        }
        if rng.random() < 0.25:
            return case
        name = sorted(options)[int(rng.integers(len(options)))]
        how, raw = _pick(rng, options[name])
        if name == "body":
            encoded = raw.encode("utf-8", "surrogateescape")
        else:
            fields = {key: json.dumps(value) for key, value in body.items() if key != name}
            fields[name] = raw
            encoded = ("{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}").encode()
        case.arguments["body"] = encoded
        case.corrupted, case.how = name, how
        return case

    def call(self, case: Case) -> Any:
        response = self.client().post(
            "/recommend", content=case.arguments["body"], headers={"content-type": "application/json"}
        )
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code}")
        if case.corrupted is not None and 400 <= response.status_code < 500 and response.status_code != 404:
            locations = json.dumps(response.json().get("detail"))
            if case.corrupted == "body" or case.corrupted in locations:
                raise ValueError(f"{case.corrupted}: refused with {response.status_code}")
            raise ValueError(f"refused with {response.status_code}, detail {locations[:200]}")
        return response

    def check(self, case: Case, result: Any) -> None:
        body = case.arguments["parsed"]
        user = body["user_id"]
        if user not in {f"u{i}" for i in range(30)}:
            if result.status_code != 404:
                raise MismatchError(f"unknown user answered {result.status_code}")
            return
        if result.status_code != 200:
            raise MismatchError(f"valid request answered {result.status_code}")
        seen = ["item-3"] if user == "u1" and body.get("exclude_seen", True) else []
        expected = self.bundle.recommend(user, body.get("k", 10), body.get("exclude", []), bool(seen))
        got = [(item["id"], item["score"]) for item in result.json()["items"]]
        if [item for item, _ in got] != [item for item, _ in expected]:
            raise MismatchError("the answer differs from the in-process bundle's")


def file_entries(directory: Path) -> list[Entry]:
    """The entries that write files (into ``directory``)."""
    return [IndexFileLoad("BruteForce", directory), IndexFileLoad("Faiss", directory), ServiceRequest(directory)]


def run_case(entry: Entry, seed: int) -> tuple[str, Case, str]:
    """Draw case ``seed`` of ``entry``, run it, and classify it: ``(outcome, case, detail)``."""
    case = entry.draw(np.random.default_rng(seed))
    try:
        result = entry.call(case)
    except (ValueError, TypeError) as error:
        if case.corrupted is None:
            return "raw error", case, f"valid input refused: {type(error).__name__}: {error}"
        named = str(case.arguments["path"]) if case.corrupted == "path" else case.corrupted
        if named in str(error):
            return "clear error", case, ""
        return "wrong name", case, f"{type(error).__name__}: {error}"
    except Exception as error:  # any other exception is a raw error
        return "raw error", case, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"
    if case.corrupted is not None and case.corrupted != "path":
        return "silent wrong", case, f"accepted {case.corrupted} ({case.how})"
    try:
        entry.check(case, result)
    except MismatchError as problem:
        return "silent wrong", case, str(problem)
    return "correct", case, ""


def count(
    entries: list[Entry], seeds: range, on_case: Callable[[str, str, Case, str], None] | None = None
) -> dict[str, dict[str, int]]:
    """Outcome counts per entry point over ``seeds``."""
    table: dict[str, dict[str, int]] = {}
    for entry in entries:
        row = table.setdefault(entry.name, dict.fromkeys(OUTCOMES, 0))
        for seed in seeds:
            outcome, case, detail = run_case(entry, seed)
            row[outcome] += 1
            if on_case is not None:
                on_case(entry.name, outcome, case, detail)
    return table
