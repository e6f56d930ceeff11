"""Independent numpy (float64) references for the Retrieval task, written from the semantics document.

Loops are used where they make the rule obvious; nothing here calls twotower.
"""

from __future__ import annotations

import numpy as np

MIN_FLOAT = float(np.finfo(np.float32).min) / 100.0


def reference_logits(
    queries: np.ndarray,
    candidates: np.ndarray,
    temperature: float | None = None,
    probability: np.ndarray | None = None,
    ids: list | None = None,
    remove_accidental_hits: bool = False,
    mask: np.ndarray | None = None,
    num_hard_negatives: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-7: returns (logits, labels) as lists of per-row arrays stacked into 2-D arrays."""
    q = queries.astype(np.float64)
    c = candidates.astype(np.float64)
    nq, nc = q.shape[0], c.shape[0]
    scores = np.zeros((nq, nc))
    for i in range(nq):
        for j in range(nc):
            scores[i, j] = float(np.dot(q[i], c[j]))
    labels = np.zeros((nq, nc))
    labels[np.arange(nq), np.arange(nq)] = 1.0
    if temperature is not None:
        scores = scores / temperature
    if probability is not None:
        scores = scores - np.log(np.clip(probability.astype(np.float64), 1e-6, 1.0))[None, :]
    if remove_accidental_hits:
        for i in range(nq):
            for j in range(nc):
                if j != i and ids[j] == ids[i]:
                    scores[i, j] += MIN_FLOAT
    if mask is not None:
        scores = np.where(mask, scores, MIN_FLOAT)
    if num_hard_negatives is not None and 0 < num_hard_negatives < nc - 1:
        kept_scores, kept_labels = [], []
        for i in range(nq):
            negatives = [j for j in range(nc) if j != i]
            negatives.sort(key=lambda j: -scores[i, j])
            columns = [i, *negatives[:num_hard_negatives]]
            kept_scores.append(scores[i, columns])
            kept_labels.append(labels[i, columns])
        scores, labels = np.array(kept_scores), np.array(kept_labels)
    return scores, labels


def reference_loss(
    logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, reduction: str = "sum"
) -> float:
    """Weighted softmax cross-entropy, summed (or divided by the number of rows)."""
    total = 0.0
    for i in range(logits.shape[0]):
        row = logits[i]
        shifted = row - row.max()  # shift first: huge removal constants would absorb log-sum-exp terms
        log_normaliser = np.log(np.sum(np.exp(shifted)))
        cross_entropy = -float(np.sum(labels[i] * (shifted - log_normaliser)))
        total += (1.0 if weights is None else float(weights[i])) * cross_entropy
    return total / logits.shape[0] if reduction == "mean" else total


def reference_top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: 1 if fewer than k logits are strictly above the positive's."""
    hits = []
    for i in range(logits.shape[0]):
        positive = logits[i, int(np.argmax(labels[i]))]
        hits.append(1.0 if np.sum(logits[i] > positive) < k else 0.0)
    return np.array(hits)


def reference_row_auc(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row: P(positive > negative) + 0.5 P(tie) over non-removed negatives (nan if none)."""
    aucs = []
    for i in range(logits.shape[0]):
        p = int(np.argmax(labels[i]))
        negatives = [logits[i, j] for j in range(logits.shape[1]) if j != p and logits[i, j] > MIN_FLOAT / 2]
        if not negatives:
            aucs.append(np.nan)
            continue
        wins = sum(1.0 if logits[i, p] > n else 0.5 if logits[i, p] == n else 0.0 for n in negatives)
        aucs.append(wins / len(negatives))
    return np.array(aucs)


def weighted_mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    w = np.ones_like(values) if weights is None else weights.astype(np.float64)
    keep = ~np.isnan(values)
    return float(np.sum(values[keep] * w[keep]) / np.sum(w[keep])) if np.sum(w[keep]) > 0 else 0.0
