"""The pipeline's model: a user-id tower and an item-id tower joined by the Retrieval task.

The towers are embedding tables initialised uniform(±``init_scale``), as Keras's ``Embedding`` is: PyTorch's
N(0, 1) default starts every score at a magnitude of about ``sqrt(dim)`` and trains to a fraction of the
accuracy. The task's in-batch softmax takes the logQ correction from the training counts (the probability that an
item is among a batch's candidates, ``1 - (1 - f) ** batch``) and, with mixed negatives, ``num_negatives``
uniformly sampled items per batch as extra negatives (Yang et al., 2020), whose inclusion probabilities join the
in-batch ones (:func:`~twotower.sampling.mixed_inclusion_probability`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from twotower.indexes import BruteForce
from twotower.models import Model
from twotower.sampling import UniformSampler, mixed_inclusion_probability
from twotower.tasks import Precision, Retrieval


class IdRetrievalModel(Model):
    """User-id and item-id towers and the in-batch softmax.

    Args:
        num_users: rows of the user table (the user vocabulary's length, OOV buckets included).
        num_items: rows of the item table (the item vocabulary's length; row 0 is OOV, never a candidate).
        embedding_dim: width of both towers.
        init_scale: the tables start uniform(-init_scale, init_scale).
        item_counts: ``[num_items]`` training counts per item, for the logQ correction; ``None``: no correction.
        batch_size: the training batch size the correction's probabilities are computed for.
        negatives: ``"in-batch"`` or ``"mixed"`` (in-batch plus ``num_negatives`` sampled items).
        num_negatives: sampled negatives per batch with ``"mixed"``.
        remove_accidental_hits: leave out of each row's softmax the other columns holding its positive item.
        precision: the loss's matrix products (see :class:`~twotower.tasks.Retrieval`).
        seed: seed of the negative sampler.
        sparse_embeddings: the tables give sparse gradients (only the batch's rows), for an optimizer whose step
            costs O(batch) rather than O(table) (:func:`~twotower.optim.sparse_keras_adagrad`): what large
            catalogues need. The same arithmetic as the dense tables.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        init_scale: float = 0.05,
        item_counts: np.ndarray | None = None,
        batch_size: int = 4096,
        negatives: str = "in-batch",
        num_negatives: int = 1024,
        remove_accidental_hits: bool = True,
        precision: Precision = "float32",
        seed: int = 0,
        sparse_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2 (the OOV row and one item), got {num_items}")
        if negatives not in ("in-batch", "mixed"):
            raise ValueError(f"negatives must be 'in-batch' or 'mixed', got {negatives!r}")
        self.user_embedding = nn.Embedding(num_users, embedding_dim, sparse=sparse_embeddings)
        self.item_embedding = nn.Embedding(num_items, embedding_dim, sparse=sparse_embeddings)
        nn.init.uniform_(self.user_embedding.weight, -init_scale, init_scale)
        nn.init.uniform_(self.item_embedding.weight, -init_scale, init_scale)
        self.negatives, self.num_negatives = negatives, num_negatives
        self.task = Retrieval(remove_accidental_hits=remove_accidental_hits, precision=precision)
        self.sampler = UniformSampler(num_items - 1)  # rows 1.. (row 0 is OOV)
        self.generator = torch.Generator().manual_seed(seed)
        self.in_batch_probability: torch.Tensor | None = None
        if item_counts is not None:
            counts = torch.as_tensor(np.asarray(item_counts, dtype=np.float64))
            if counts.shape != (num_items,):
                raise ValueError(f"item_counts must have shape ({num_items},), got {tuple(counts.shape)}")
            # Half a pseudo-count: an item never seen in training still has a small, positive probability.
            frequency = counts.clamp(min=0.5) / counts.clamp(min=0.5).sum()
            self.in_batch_probability = (1.0 - (1.0 - frequency) ** batch_size).clamp(1e-9, 1.0).to(torch.float32)

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        """``batch`` is ``(user rows [b], item rows [b])`` or with ``weights [b]``; returns the SUM softmax loss."""
        users, items = batch[0], batch[1]
        weights = batch[2] if len(batch) > 2 else None
        queries = self.user_embedding(users)
        candidate_rows = items
        probability = None if self.in_batch_probability is None else self.in_batch_probability[items]
        if self.negatives == "mixed" and training:
            sampled, _ = self.sampler.sample(self.num_negatives, generator=self.generator)
            sampled = sampled + 1
            candidate_rows = torch.cat([items, sampled])
            if self.in_batch_probability is not None:
                in_batch = self.in_batch_probability[candidate_rows]
                sampler_inclusion = self.sampler.inclusion(candidate_rows - 1, self.num_negatives)
                probability = mixed_inclusion_probability(in_batch, sampler_inclusion)
        loss: torch.Tensor = self.task(
            queries,
            self.item_embedding(candidate_rows),
            sample_weight=weights,
            candidate_sampling_probability=probability,
            candidate_ids=candidate_rows if self.task.remove_accidental_hits else None,
            compute_metrics=not training,  # a task given factorized metrics updates them in evaluate()
        )
        return loss

    def item_index(self, first_row: int = 1) -> BruteForce:
        """An exact index of every item row from ``first_row`` on, with the rows as ids (``int64``)."""
        with torch.no_grad():
            embeddings = self.item_embedding.weight[first_row:].detach().clone()
        return BruteForce(k=100).index(embeddings, torch.arange(first_row, first_row + embeddings.shape[0]))
