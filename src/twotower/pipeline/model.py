"""The pipeline's models: id towers (:class:`IdRetrievalModel`) or feature towers (:class:`FeatureRetrievalModel`)
joined by the Retrieval task.

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

from twotower.features import FeatureTower
from twotower.indexes import BruteForce
from twotower.models import Model
from twotower.pipeline.prepared import PartRows
from twotower.sampling import UniformSampler, mixed_inclusion_probability
from twotower.tasks import Precision, Retrieval


class SoftmaxRetrievalModel(Model):
    """What the pipeline's models share: the in-batch softmax with the logQ correction from the training counts,
    mixed negatives, and the corpus of every item row from 1 on (row 0 is the OOV item, never a candidate).

    Subclasses give :meth:`query_batch_embeddings` (a training or evaluation batch's queries),
    :meth:`candidate_embeddings` (item rows to embeddings) and :meth:`query_embeddings` (a split part's rows).
    """

    def __init__(
        self,
        num_items: int,
        item_counts: np.ndarray | None,
        batch_size: int,
        negatives: str,
        num_negatives: int,
        remove_accidental_hits: bool,
        precision: Precision,
        seed: int,
    ) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2 (the OOV row and one item), got {num_items}")
        if negatives not in ("in-batch", "mixed"):
            raise ValueError(f"negatives must be 'in-batch' or 'mixed', got {negatives!r}")
        self.num_items = num_items
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

    #: Whether the model can rank users outside the user vocabulary from their other features (evaluation then
    #: ranks cold users by the model beside popularity).
    answers_cold_users = False

    def query_batch_embeddings(self, batch: Any) -> torch.Tensor:
        """``[b, d]`` query embeddings of a batch's first element."""
        raise NotImplementedError

    def candidate_embeddings(self, item_rows: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` embeddings of item rows ``[n]``."""
        raise NotImplementedError

    def query_embeddings(self, part: PartRows, positions: np.ndarray, user_rows: np.ndarray) -> torch.Tensor:
        """``[len(positions), d]`` query embeddings (no gradient) of rows ``positions`` of ``part``, whose user
        vocabulary rows are ``user_rows``."""
        raise NotImplementedError

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        """``batch`` is ``(queries, item rows [b])`` or with ``weights [b]``; returns the SUM softmax loss."""
        items = batch[1]
        weights = batch[2] if len(batch) > 2 else None
        queries = self.query_batch_embeddings(batch)
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
            self.candidate_embeddings(candidate_rows),
            sample_weight=weights,
            candidate_sampling_probability=probability,
            candidate_ids=candidate_rows if self.task.remove_accidental_hits else None,
            compute_metrics=not training,  # a task given factorized metrics updates them in evaluate()
        )
        return loss

    def corpus_embeddings(self, first_row: int = 1, batch_size: int = 8192) -> torch.Tensor:
        """``[num_items - first_row, d]``: every item row's embedding from ``first_row`` on (no gradient)."""
        rows = torch.arange(first_row, self.num_items)
        with torch.no_grad():
            parts = [self.candidate_embeddings(rows[start : start + batch_size])
                     for start in range(0, rows.shape[0], batch_size)]  # fmt: skip
        return torch.cat(parts).detach().clone()

    def item_index(self, first_row: int = 1, batch_size: int = 8192) -> BruteForce:
        """An exact index of every item row from ``first_row`` on, with the rows as ids (``int64``)."""
        return BruteForce(k=100).index(
            self.corpus_embeddings(first_row, batch_size), torch.arange(first_row, self.num_items)
        )


class IdRetrievalModel(SoftmaxRetrievalModel):
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
        super().__init__(num_items, item_counts, batch_size, negatives, num_negatives, remove_accidental_hits,
                         precision, seed)  # fmt: skip
        self.user_embedding = nn.Embedding(num_users, embedding_dim, sparse=sparse_embeddings)
        self.item_embedding = nn.Embedding(num_items, embedding_dim, sparse=sparse_embeddings)
        nn.init.uniform_(self.user_embedding.weight, -init_scale, init_scale)
        nn.init.uniform_(self.item_embedding.weight, -init_scale, init_scale)

    def query_batch_embeddings(self, batch: Any) -> torch.Tensor:
        embeddings: torch.Tensor = self.user_embedding(batch[0])
        return embeddings

    def candidate_embeddings(self, item_rows: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.item_embedding(item_rows)
        return embeddings

    def query_embeddings(self, part: PartRows, positions: np.ndarray, user_rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            embeddings: torch.Tensor = self.user_embedding(torch.from_numpy(user_rows))
        return embeddings

    def corpus_embeddings(self, first_row: int = 1, batch_size: int = 8192) -> torch.Tensor:
        return self.item_embedding.weight[first_row:].detach().clone()


class FeatureRetrievalModel(SoftmaxRetrievalModel):
    """Feature towers (:class:`~twotower.features.FeatureTower`) and the in-batch softmax.

    Args:
        query_tower: the query features' tower.
        candidate_tower: the item features' tower; its output width must be the query tower's.
        inputs: the towers' inputs for the data (:class:`~twotower.pipeline.features.TowerInputs`): the item
            rows' candidate inputs and each interaction's query inputs.
        the rest: as :class:`IdRetrievalModel`.

    A training batch is ``(query inputs {name: [b, ...]}, item rows [b])`` or with ``weights [b]``.
    """

    answers_cold_users = True

    def __init__(
        self,
        query_tower: FeatureTower,
        candidate_tower: FeatureTower,
        inputs: Any,
        item_counts: np.ndarray | None = None,
        batch_size: int = 4096,
        negatives: str = "in-batch",
        num_negatives: int = 1024,
        remove_accidental_hits: bool = True,
        precision: Precision = "float32",
        seed: int = 0,
    ) -> None:
        num_items = int(next(iter(inputs.item_inputs.values())).shape[0])
        super().__init__(num_items, item_counts, batch_size, negatives, num_negatives, remove_accidental_hits,
                         precision, seed)  # fmt: skip
        if query_tower.output_dim != candidate_tower.output_dim:
            raise ValueError(
                f"the towers' outputs differ in width (query {query_tower.output_dim}, candidate "
                f"{candidate_tower.output_dim}): give layer_sizes, or features whose widths add up to the same"
            )
        self.query_tower, self.candidate_tower, self.inputs = query_tower, candidate_tower, inputs

    def query_batch_embeddings(self, batch: Any) -> torch.Tensor:
        embeddings: torch.Tensor = self.query_tower(batch[0])
        return embeddings

    def candidate_embeddings(self, item_rows: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.candidate_tower(
            {name: values[item_rows] for name, values in self.inputs.item_inputs.items()}
        )
        return embeddings

    def query_embeddings(self, part: PartRows, positions: np.ndarray, user_rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            embeddings: torch.Tensor = self.query_tower(self.inputs.query_inputs(part.log_rows[positions]))
        return embeddings
