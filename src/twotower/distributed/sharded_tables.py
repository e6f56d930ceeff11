"""Embedding tables sharded across ranks with TorchRec, under twotower's cross-rank negatives.

When one process should not hold every table (a user table of hundreds of millions of rows), the towers of
:class:`ShardedIdRetrievalModel` are one TorchRec ``EmbeddingBagCollection`` sharded by
``DistributedModelParallel``: each rank holds its share of the rows (``"row_wise"``) or whole tables
(``"table_wise"``), an all-to-all brings every rank the rows of its batch, and the tables' optimizer is fused into
the backward (FBGEMM's kernels: the update is applied as each shard's gradient arrives; no gradient is stored).
On top, twotower's :class:`~twotower.tasks.Retrieval` scores each rank's queries against every rank's candidates
(:func:`twotower.distributed.global_candidates`), so the loss and the updates are those of one process on the
global batch, the same arithmetic as :class:`~twotower.pipeline.model.IdRetrievalModel`.

TorchRec is optional and not part of the core install: ``bash benchmarks/torchrec_env.sh`` builds an environment
with ``torchrec==1.8.0`` and ``fbgemm-gpu-cpu==1.8.0`` (CPU kernels, gloo). On GPUs the same code takes NCCL and
``fbgemm-gpu``; the planner then places the shards by HBM, and UVM caching can hold tables larger than it.

Not here (yet): checkpoints of the sharded tables (TorchRec's state dict holds ``ShardedTensor`` shards, for
``torch.distributed.checkpoint``; ``Model.save_checkpoint`` writes one file from rank 0).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from twotower import distributed
from twotower._checks import require_number, require_positive_int, require_tensor
from twotower.models import Model
from twotower.tasks import Retrieval

Sharding = Literal["row_wise", "table_wise"]
TableOptimizer = Literal["adagrad", "rowwise-adagrad", "sgd"]

_TABLES = ("user", "item")  # not "items": a ModuleDict of tables has an items() method


_INIT_BLOCK = 1 << 16


def initial_rows(seed: int, start: int, stop: int, dim: int, scale: float) -> torch.Tensor:
    """Rows ``start .. stop - 1`` of a ``[rows, dim]`` table initialised uniform(-scale, scale) from ``seed``, the
    same whichever rows are asked for: drawn in blocks of 65,536 rows, each from its own seed, so that every rank
    draws only its shard and one process the whole table, to the same values."""
    parts = []
    for block in range(start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.empty(_INIT_BLOCK, dim).uniform_(-scale, scale, generator=generator)
        low, high = max(start - block * _INIT_BLOCK, 0), min(stop - block * _INIT_BLOCK, _INIT_BLOCK)
        parts.append(values[low:high])
    return torch.cat(parts) if parts else torch.empty(0, dim)


def _require_rows(rows: Any, name: str, num_rows: int) -> torch.Tensor:
    """``rows`` as a tensor of table rows: 1-D integers in ``[0, num_rows)``. Outside the table, FBGEMM's
    bounds check (torchrec 1.8) logs an error and uses row 0 instead: a silent wrong answer, and a wrong update."""
    tensor = require_tensor(rows, name)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of row indices [b], got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integer row indices, got {tensor.dtype}")
    if tensor.numel() > 0:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= num_rows:
            bad = low if low < 0 else high
            raise ValueError(f"{name} must lie in [0, {num_rows}) (the table's rows), got {bad}")
    return tensor


def _require_torchrec() -> Any:
    try:
        import torchrec
    except ImportError as error:  # pragma: no cover - the message is the point
        raise ImportError(
            "ShardedIdRetrievalModel needs TorchRec: build its environment with `bash benchmarks/torchrec_env.sh` "
            f"(torchrec==1.8.0 and fbgemm-gpu-cpu==1.8.0, installed with --no-deps): {error}"
        ) from error
    return torchrec


class ShardedIdRetrievalModel(Model):
    """User-id and item-id towers as one TorchRec ``EmbeddingBagCollection`` sharded over the process group, and
    the in-batch softmax over the global batch.

    Call it on every rank of an initialised process group (gloo on CPUs, NCCL on GPUs), each with its share of
    every global batch (``Batches(..., shard=True)`` or :class:`~twotower.data.streaming.ParquetBatches`).

    Args:
        num_users, num_items: rows of the two tables.
        embedding_dim: width of both towers.
        sharding: ``"row_wise"``: every table split by rows over the ranks; ``"table_wise"``: each table whole
            on one rank.
        optimizer: the tables' fused optimizer: ``"adagrad"`` (FBGEMM's exact Adagrad: ``acc += g ** 2; row -=
            lr * g / (sqrt(acc) + eps)``, the accumulator starting at 0) or ``"rowwise-adagrad"`` (one
            accumulator per row, the mean of the squared gradient) or ``"sgd"`` (``row -= lr * g``).
        learning_rate, eps: the optimizer's.
        init_scale: the tables start uniform(-init_scale, init_scale), as Keras's ``Embedding``.
        remove_accidental_hits: as :class:`~twotower.tasks.Retrieval`'s.
        seed: seed of the initial weights: the user table is :func:`initial_rows` of ``seed``, the item table of
            ``seed + 1``, whatever the sharding (each rank draws its own rows only).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        sharding: Sharding = "row_wise",
        optimizer: TableOptimizer = "adagrad",
        learning_rate: float = 0.1,
        eps: float = 1e-7,
        init_scale: float = 0.05,
        remove_accidental_hits: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The arguments first: a mistake is named whether or not TorchRec is installed.
        if sharding not in ("row_wise", "table_wise"):
            raise ValueError(f"sharding must be 'row_wise' or 'table_wise', got {sharding!r}")
        if optimizer not in ("adagrad", "rowwise-adagrad", "sgd"):
            raise ValueError(f"optimizer must be 'adagrad', 'rowwise-adagrad' or 'sgd', got {optimizer!r}")
        num_users, num_items = (
            require_positive_int(num_users, "num_users"),
            require_positive_int(num_items, "num_items"),
        )
        embedding_dim = require_positive_int(embedding_dim, "embedding_dim")
        learning_rate = require_number(learning_rate, "learning_rate", 0.0, math.inf, low_open=True)
        eps = require_number(eps, "eps", 0.0, math.inf)
        init_scale = require_number(init_scale, "init_scale", 0.0, math.inf)
        for name, number in (("learning_rate", learning_rate), ("eps", eps), ("init_scale", init_scale)):
            if not math.isfinite(number):
                raise ValueError(f"{name} must be finite, got {number!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(remove_accidental_hits, bool):
            raise TypeError(f"remove_accidental_hits must be a bool, got {type(remove_accidental_hits).__name__}")
        _require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.comm_ops import set_gradient_division
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingEnv
        from torchrec.modules.embedding_configs import PoolingType
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad as TorchRecRowWiseAdagrad

        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("ShardedIdRetrievalModel needs an initialised process group (torchrun, gloo or NCCL)")
        self.num_users, self.num_items, self.embedding_dim = num_users, num_items, embedding_dim
        self.sharding = sharding
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._seed, self._init_scale = seed, init_scale
        tables = [
            EmbeddingBagConfig(
                name=name,
                embedding_dim=embedding_dim,
                num_embeddings=rows,
                feature_names=[name],
                pooling=PoolingType.SUM,
            )
            for name, rows in zip(_TABLES, (num_users, num_items), strict=True)
        ]
        collection = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        # Fused into the backward: FBGEMM's kernel for each (torch's Adagrad and SGD map to EXACT_ADAGRAD and
        # EXACT_SGD, TorchRec's RowWiseAdagrad to EXACT_ROWWISE_ADAGRAD).
        kinds: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
            "adagrad": (torch.optim.Adagrad, {"lr": learning_rate, "eps": eps}),
            "rowwise-adagrad": (TorchRecRowWiseAdagrad, {"lr": learning_rate, "eps": eps}),
            "sgd": (torch.optim.SGD, {"lr": learning_rate}),
        }
        kind, settings = kinds[optimizer]
        apply_optimizer_in_backward(kind, collection.parameters(), settings)

        class Sharder(EmbeddingBagCollectionSharder):  # type: ignore[misc]  # TorchRec is untyped here
            # TorchRec offers row-wise sharding on CUDA only; its CPU kernels (FBGEMM's block bucketize, the TBE
            # lookup) run it on gloo as well, and the tests check it against one process.
            def sharding_types(self, compute_device_type: str) -> list[str]:
                types: list[str] = super().sharding_types(compute_device_type)
                return types if "row_wise" in types else [*types, "row_wise"]

        sharder = Sharder()
        # TorchRec divides the tables' gradients by the world size by default (DDP's mean over ranks); twotower's
        # ranks each compute their queries' share of one global loss, whose gradient is the sum. (A process-wide
        # TorchRec setting: a TorchRec model of mean-loss semantics in the same process would need it back.)
        set_gradient_division(False)
        world = torch.distributed.get_world_size()
        constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in _TABLES}
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device=device.type), constraints=constraints
        )
        group = torch.distributed.group.WORLD
        plan = planner.collective_plan(collection, [sharder], group)
        self.tables = DistributedModelParallel(
            collection, env=ShardingEnv.from_process_group(group), device=device, plan=plan,
            sharders=[sharder],
        )  # fmt: skip
        self.plan = plan
        self._initialise_shards()
        self.task = Retrieval(remove_accidental_hits=remove_accidental_hits)
        self.device = device

    @property
    def table_optimizer(self) -> torch.optim.Optimizer:
        """The fused optimizer (a TorchRec ``KeyedOptimizer``): its ``step`` is a no-op, the update happens in the
        backward; pass it to :meth:`~twotower.models.Model.fit` as the optimizer."""
        optimizer: torch.optim.Optimizer = self.tables.fused_optimizer
        return optimizer

    def _shards(self) -> dict[str, list[tuple[torch.Tensor, list[int]]]]:
        """This rank's shards of each table: ``(tensor, [row offset, column offset])``."""
        found: dict[str, list[tuple[torch.Tensor, list[int]]]] = {name: [] for name in _TABLES}
        for key, value in self.tables.state_dict().items():
            name = next((table for table in _TABLES if f".{table}.weight" in key), None)
            if name is None or not hasattr(value, "local_shards"):
                continue
            found[name] += [(shard.tensor, list(shard.metadata.shard_offsets)) for shard in value.local_shards()]
        return found

    @torch.no_grad()
    def _initialise_shards(self) -> None:
        for number, (_name, shards) in enumerate(self._shards().items()):
            for tensor, (row, column) in shards:
                # Block by block: a shard-sized temporary would double the rank's memory at the start.
                for begin in range(0, tensor.shape[0], _INIT_BLOCK):
                    end = min(begin + _INIT_BLOCK, tensor.shape[0])
                    rows = initial_rows(self._seed + number, row + begin, row + end, self.embedding_dim,
                                        self._init_scale)  # fmt: skip
                    tensor[begin:end].copy_(rows[:, column : column + tensor.shape[1]])

    @torch.no_grad()
    def full_table(self, name: str) -> torch.Tensor:
        """``[rows, dim]`` the whole table ``"user"`` or ``"item"``, assembled from every rank's shards (on every
        rank: a collective, call it on all of them). For evaluation, an index or export."""
        if name not in _TABLES:
            raise ValueError(f"name must be one of {_TABLES}, got {name!r}")
        rows = self.num_users if name == "user" else self.num_items
        full = torch.zeros(rows, self.embedding_dim)
        for tensor, (row, column) in self._shards()[name]:
            full[row : row + tensor.shape[0], column : column + tensor.shape[1]] = tensor.cpu()
        # Each rank filled its own rows and left the others at zero: the sum over ranks is the table.
        return distributed.all_reduce_sum(full)

    def embed(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([b, dim], [b, dim])`` the rows of this rank's ``users`` and ``items`` (``[b]`` each), fetched from
        whichever ranks hold them."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        users = _require_rows(users, "users", self.num_users).to(self.device, torch.int64)
        items = _require_rows(items, "items", self.num_items).to(self.device, torch.int64)
        if users.shape != items.shape:
            raise ValueError(f"users and items must be [b] each, got {tuple(users.shape)} and {tuple(items.shape)}")
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(_TABLES), values=torch.cat([users, items]),
            lengths=torch.ones(2 * users.shape[0], dtype=torch.int64, device=self.device),
        )  # fmt: skip
        pooled = self.tables(features)
        if hasattr(pooled, "wait"):
            pooled = pooled.wait()
        return pooled["user"], pooled["item"]

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        """``batch`` is this rank's ``(user rows [b], item rows [b])``; returns its SUM softmax loss against the
        global batch's candidates."""
        users, items = batch[0], batch[1]
        queries, candidates = self.embed(users, items)
        loss: torch.Tensor = self.task(
            queries, candidates, candidate_ids=items.to(torch.int64) if self.task.remove_accidental_hits else None,
            compute_metrics=not training,
        )  # fmt: skip
        return loss
