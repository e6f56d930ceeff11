"""twotower: factorized (two-tower) retrieval for PyTorch.

The main pieces:

* :mod:`twotower.tasks` -- :class:`~twotower.tasks.Retrieval`, the in-batch softmax task, equal to TFRS's.
* :mod:`twotower.losses` -- its composable parts (hard negatives, accidental hits, sampling correction).
* :mod:`twotower.metrics` -- loss, batch and factorized (whole-corpus) metrics on torchmetrics.
* :mod:`twotower.indexes` -- exact top-K indexes (in memory, streaming).
* :mod:`twotower.models` -- :class:`~twotower.models.Model`: ``compute_loss``, ``fit``, ``evaluate``, checkpoints.
* :mod:`twotower.sampling` -- frequency estimation, negative samplers, cached negatives.
* :mod:`twotower.distributed` -- negatives shared across ``torch.distributed`` ranks.
"""

from twotower.indexes import BruteForce, Streaming, TopK
from twotower.losses import (
    HardNegativeMining,
    RemoveAccidentalHits,
    SamplingProbabilityCorrection,
    SoftmaxCrossEntropy,
)
from twotower.metrics import BatchAUC, BatchTopKAccuracy, CorpusRanking, FactorizedMetric, FactorizedTopK, LossMean
from twotower.models import Model
from twotower.tasks import Retrieval

__version__ = "0.1.0"

__all__ = [
    "BatchAUC",
    "BatchTopKAccuracy",
    "BruteForce",
    "CorpusRanking",
    "FactorizedMetric",
    "FactorizedTopK",
    "HardNegativeMining",
    "LossMean",
    "Model",
    "RemoveAccidentalHits",
    "Retrieval",
    "SamplingProbabilityCorrection",
    "SoftmaxCrossEntropy",
    "Streaming",
    "TopK",
    "__version__",
]
