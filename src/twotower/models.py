"""The model base class: ``compute_loss`` in the subclass; training, evaluation and checkpoints here.

As in ``tfrs.Model``, a subclass implements :meth:`Model.compute_loss`; :meth:`Model.fit` adds the
regularization loss, steps the optimizer and reports every metric of the model's tasks together with ``loss``,
``regularization_loss`` and ``total_loss``. Unlike TFRS, factorized (whole-corpus) metrics are switched off while
training and on while evaluating by default, since they cost a full corpus ranking per batch.

Checkpoints hold the model, the optimizer, the epoch, the history and every random state that shapes the next
epoch (torch, numpy, Python, and the train loader's generator), so a run stopped between epochs resumes to the
same numbers. They are written atomically with a SHA-256 sidecar and verified on load.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import math
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower import distributed
from twotower._files import atomic_write
from twotower.tasks import Retrieval

# ``checkpoint-epochNNNN.pt``: after epoch NNNN; ``checkpoint-epochNNNN-stepSSSSSSSS.pt``: SSSSSSSS steps into
# epoch NNNN (written with ``checkpoint_every``).
_CHECKPOINT = re.compile(r"^checkpoint-epoch(\d{4,})(?:-step(\d{8,}))?\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match the model."""


class Model(nn.Module, abc.ABC):
    """Base class of retrieval models: implement :meth:`compute_loss`, then :meth:`fit` and :meth:`evaluate`."""

    @abc.abstractmethod
    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        """Return the scalar loss of ``batch`` (and update the tasks' metrics through the task call)."""

    def regularization_loss(self) -> torch.Tensor:
        """Extra loss added to the task loss in training (e.g. weight decay terms); 0 by default."""
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else None
        return torch.zeros((), device=device)

    def tasks(self) -> list[Retrieval]:
        """Every :class:`~twotower.tasks.Retrieval` task among the model's submodules."""
        return [module for module in self.modules() if isinstance(module, Retrieval)]

    def metric_results(self) -> dict[str, float]:
        """Current values of every task metric, ``{name: value}``."""
        results: dict[str, float] = {}
        for task in self.tasks():
            results.update(task.metric_results())
        return results

    def updated_metric_results(self) -> dict[str, float]:
        """:meth:`metric_results` of the metrics updated since their last reset only."""
        results: dict[str, float] = {}
        for task in self.tasks():
            for metric in task.all_metrics():
                if metric.update_count > 0:
                    results.update(metric.results())
        return results

    def reset_metrics(self) -> None:
        """Reset every task metric."""
        for task in self.tasks():
            task.reset_metrics()

    @contextlib.contextmanager
    def factorized_metrics(self, enabled: bool) -> Iterator[None]:
        """Within the block, every task computes its factorized metrics only if ``enabled``."""
        tasks = self.tasks()
        previous = [task.factorized_metrics_enabled for task in tasks]
        for task in tasks:
            task.factorized_metrics_enabled = enabled
        try:
            yield
        finally:
            for task, value in zip(tasks, previous, strict=True):
                task.factorized_metrics_enabled = value

    def train_step(self, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One optimisation step; returns ``loss``, ``regularization_loss`` and ``total_loss`` of the batch."""
        loss = self.compute_loss(batch, training=True)
        if type(self).regularization_loss is Model.regularization_loss:
            # No regularization: skip adding a zero, which costs a few operations per step in forward and backward.
            regularization, total = torch.zeros(()), loss
        else:
            regularization = self.regularization_loss()
            # Gradients are summed over ranks: each rank carries 1/ranks of the (replicated) regularization.
            total = loss + regularization / distributed.world_size()
        total_value = float(total.detach())
        if not math.isfinite(total_value):
            raise FloatingPointError(f"the training loss became {total_value}: lower the learning rate?")
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        distributed.all_reduce_gradients(self.parameters())
        optimizer.step()
        global_loss = float(distributed.all_reduce_sum(loss.detach()))
        return {
            "loss": global_loss,
            "regularization_loss": float(regularization.detach()),
            "total_loss": global_loss + float(regularization.detach()),
        }

    def fit(
        self,
        train: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        epochs: int = 1,
        validation: Iterable[Any] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        compute_factorized_metrics: bool = False,
        progress: bool = True,
        on_epoch_end: Callable[[dict[str, float]], bool] | None = None,
        checkpoint_every: int | None = None,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs over ``train``.

        Args:
            train: an iterable of batches (e.g. a ``DataLoader``), iterated once per epoch.
            optimizer: the optimizer of the model's parameters.
            epochs: the total number of epochs (a resumed run continues up to it).
            validation: optional batches evaluated after each epoch; its metrics get a ``val_`` prefix.
            checkpoint_dir: where to write ``checkpoint-epochNNNN.pt`` after each epoch.
            resume: continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
            compute_factorized_metrics: also compute whole-corpus metrics on training batches (slow).
            progress: show a progress bar (tqdm), on a terminal only: piped output gets no bar.
            on_epoch_end: called with each epoch's record (after validation and the checkpoint); returning
                ``True`` stops training (early stopping).
            checkpoint_every: also write ``checkpoint-epochNNNN-stepSSSSSSSS.pt`` every this many steps within
                an epoch (keeping only the newest such file), so that a run killed mid-epoch resumes on the batch
                it would have trained on next; ``train`` must then tell its position (``state_dict`` and
                ``load_state_dict``, as :class:`~twotower.data.batches.Batches` and
                :class:`~twotower.data.streaming.ParquetBatches` do).

        Returns:
            The history: one dict per epoch with the task metrics that the epoch computed (a metric that was not
            updated, such as the factorized metrics while ``compute_factorized_metrics`` is off, is left out
            rather than reported as 0), ``loss``, ``regularization_loss`` and ``total_loss`` (means over the
            epoch's batches; TFRS reports the last batch's), and ``epoch``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        history: list[dict[str, float]] = []
        start_epoch = 0
        directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if directory is not None and directory.exists() and not directory.is_dir():
            raise ValueError(f"checkpoint_dir must be a directory, but {directory} is a file")
        if checkpoint_every is not None:
            if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be a positive int of steps, got {checkpoint_every!r}")
            if directory is None:
                raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
            if not (hasattr(train, "state_dict") and hasattr(train, "load_state_dict")):
                raise ValueError(f"checkpoint_every needs batches that tell their position (state_dict and "
                                 f"load_state_dict), and {type(train).__name__} does not")  # fmt: skip
        partial: dict[str, Any] | None = None
        if directory is not None and resume:
            latest = latest_checkpoint(directory, verified=True)
            if latest is not None:
                state = self.load_checkpoint(latest, optimizer, train)
                start_epoch, history = int(state["epoch"]), list(state["history"])
                partial = state.get("partial")
        for epoch in range(start_epoch, epochs):
            self.train()
            self.reset_metrics()
            sums = {"loss": 0.0, "regularization_loss": 0.0, "total_loss": 0.0}
            batches = 0
            if partial is not None:  # resumed mid-epoch: the epoch's sums and metrics so far
                sums, batches = {key: float(value) for key, value in partial["sums"].items()}, int(partial["steps"])
                self._set_metric_states(partial["metrics"])
                partial = None
            with self.factorized_metrics(compute_factorized_metrics):
                bar = _progress(train, f"epoch {epoch + 1}/{epochs}", progress and distributed.rank() == 0)
                for batch in bar:
                    step = self.train_step(batch, optimizer)
                    batches += 1
                    for key in sums:
                        sums[key] += step[key]
                    if progress and hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{sums['loss'] / batches:.2f}")
                    if checkpoint_every is not None and directory is not None and batches % checkpoint_every == 0:
                        self._write_checkpoint(directory, f"checkpoint-epoch{epoch + 1:04d}-step{batches:08d}.pt",
                                               optimizer, epoch, history, train,
                                               {"sums": dict(sums), "steps": batches,
                                                "metrics": self._metric_states()})  # fmt: skip
            if batches == 0:
                raise ValueError("train yielded no batches")
            record = {**self.updated_metric_results(), **{key: value / batches for key, value in sums.items()}}
            record["epoch"] = float(epoch + 1)
            if validation is not None:
                record.update({f"val_{key}": value for key, value in self.evaluate(validation, progress=False).items()})
            history.append(record)
            if directory is not None:
                self._write_checkpoint(directory, f"checkpoint-epoch{epoch + 1:04d}.pt", optimizer, epoch + 1,
                                       history, train)  # fmt: skip
            if on_epoch_end is not None and on_epoch_end(record):
                break
        return history

    def _write_checkpoint(
        self,
        directory: Path,
        name: str,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        history: list[dict[str, float]],
        train: Iterable[Any],
        partial: dict[str, Any] | None = None,
    ) -> None:
        # One writer; the other ranks wait so that nobody resumes from a half-written directory. (Under
        # torch.distributed a loader's position is rank 0's: a stream resumed mid-epoch across ranks would need
        # every rank's, so mid-epoch checkpoints there are written for rank 0's reader only.)
        if distributed.rank() == 0:
            self.save_checkpoint(directory / name, optimizer, epoch, history, train, partial)
            # Mid-epoch checkpoints are for surviving a kill: only the newest one is worth its disk.
            for older in directory.glob("checkpoint-epoch*-step*.pt"):
                if older.name != name and _CHECKPOINT.match(older.name):
                    older.unlink(missing_ok=True)
                    older.with_name(older.name + ".sha256").unlink(missing_ok=True)
        if distributed.is_distributed():
            torch.distributed.barrier()

    def _metric_states(self) -> list[dict[str, Any]]:
        return [
            {"update_count": metric.update_count,
             "state": {name: _copied(value) for name, value in metric.metric_state.items()}}
            for task in self.tasks() for metric in task.all_metrics()
        ]  # fmt: skip

    def _set_metric_states(self, states: list[dict[str, Any]]) -> None:
        metrics = [metric for task in self.tasks() for metric in task.all_metrics()]
        if len(states) != len(metrics):
            raise CheckpointError(f"the checkpoint holds {len(states)} metric states, the model has {len(metrics)}")
        for metric, saved in zip(metrics, states, strict=True):
            for name, value in saved["state"].items():
                setattr(metric, name, _copied(value))
            metric._update_count = int(saved["update_count"])
            metric._computed = None

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[Any], compute_factorized_metrics: bool = True, progress: bool = True
    ) -> dict[str, float]:
        """Evaluate over ``batches``: every task metric, and ``loss``, ``regularization_loss``, ``total_loss``
        (the loss is the mean over batches)."""
        self.eval()
        self.reset_metrics()
        total, count = 0.0, 0
        with self.factorized_metrics(compute_factorized_metrics):
            for batch in _progress(batches, "evaluate", progress and distributed.rank() == 0):
                total += float(self.compute_loss(batch, training=False))
                count += 1
        if count == 0:
            raise ValueError("batches yielded no batch to evaluate")
        if distributed.is_distributed():
            # The task's loss is local to each rank's queries: the global loss sums the ranks'.
            total = float(distributed.all_reduce_sum(torch.tensor(total)))
        regularization = float(self.regularization_loss())
        return {
            **self.metric_results(),
            "loss": total / count,
            "regularization_loss": regularization,
            "total_loss": total / count + regularization,
        }

    def save_checkpoint(
        self,
        path: str | os.PathLike[str],
        optimizer: torch.optim.Optimizer | None = None,
        epoch: int = 0,
        history: list[dict[str, float]] | None = None,
        train: Iterable[Any] | None = None,
        partial: dict[str, Any] | None = None,
    ) -> None:
        """Write model, optimizer, epoch, history and random states to ``path`` atomically, with ``path.sha256``.

        ``epoch`` is the number of finished epochs; ``partial`` (mid-epoch) the current epoch's loss sums, steps
        and metric states. A ``train`` with ``state_dict`` (its position) has it saved too.
        """
        generator = getattr(train, "generator", None)
        state = {
            "format": "twotower.checkpoint/1",
            "model": self.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "epoch": epoch,
            "history": history or [],
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state(),
            "python_rng": repr(random.getstate()),
            "loader_rng": generator.get_state() if isinstance(generator, torch.Generator) else None,
            "loader_state": train.state_dict() if train is not None and hasattr(train, "state_dict") else None,
            "partial": partial,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        path = Path(path)
        atomic_write(path, payload)
        atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(payload).hexdigest().encode())

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        optimizer: torch.optim.Optimizer | None = None,
        train: Iterable[Any] | None = None,
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns its contents. Verifies the checksum."""
        state = read_checkpoint(path)
        try:
            self.load_state_dict(state["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{path} does not match this model: {error}") from error
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        _set_numpy_state(state["numpy_rng"])
        random.setstate(_literal(state["python_rng"]))
        generator = getattr(train, "generator", None)
        if isinstance(generator, torch.Generator) and state["loader_rng"] is not None:
            generator.set_state(state["loader_rng"])
        if state.get("loader_state") is not None and train is not None and hasattr(train, "load_state_dict"):
            try:
                train.load_state_dict(state["loader_state"])
            except ValueError as error:
                raise CheckpointError(f"{path} was written for other training batches: {error}") from error
        return state


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint file (its ``.sha256`` sidecar must match)."""
    path = Path(path)
    digest_path = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not digest_path.is_file():
        raise CheckpointError(f"{path} has no checksum file {digest_path.name}: refusing an unverified checkpoint")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != digest_path.read_bytes().strip().decode("ascii", "replace"):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {digest_path.name}")
    try:
        # weights_only: torch's restricted unpickler, which builds tensors and plain containers and refuses any
        # other object, so a checkpoint cannot run code even if its sidecar was forged to match.
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others for foreign payloads
        raise CheckpointError(f"{path} is not a readable twotower checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != "twotower.checkpoint/1":
        raise CheckpointError(f"{path} is not a twotower checkpoint")
    return state


def latest_checkpoint(directory: str | os.PathLike[str], verified: bool = False) -> Path | None:
    """The checkpoint with the highest epoch in ``directory``, or ``None``.

    Args:
        directory: where :meth:`Model.fit` writes checkpoints.
        verified: return the newest checkpoint that also verifies (file and checksum sidecar present and
            matching, contents a twotower checkpoint), skipping newer ones with a warning: a run killed between
            writing a checkpoint and its sidecar then resumes from the one before instead of failing.

    Raises:
        CheckpointError: with ``verified``, when checkpoints exist but none verifies (resuming from scratch
            would silently overwrite them).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    # After epoch E sorts after every step of epoch E and before any step of epoch E + 1.
    found = [
        ((int(match.group(1)), int(match.group(2)) if match.group(2) else math.inf), path)
        for path in directory.iterdir()
        if (match := _CHECKPOINT.match(path.name))
    ]
    if not verified:
        return max(found)[1] if found else None
    first_error: CheckpointError | None = None
    for _, path in sorted(found, reverse=True):
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            first_error = first_error or error
            warnings.warn(f"skipping a checkpoint that does not verify: {error}", stacklevel=2)
            continue
        return path
    if first_error is not None:
        raise first_error
    return None


def _progress(batches: Iterable[Any], description: str, enabled: bool) -> Iterable[Any]:
    # A bar redrawn with carriage returns is noise in a log file or a pipe: bars only on a terminal.
    if not enabled or not sys.stderr.isatty():
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if isinstance(batches, Sized) else None
    bar: Iterable[Any] = tqdm(batches, desc=description, total=total, leave=False, dynamic_ncols=True)
    return bar


def _copied(value: Any) -> Any:
    """A metric state (a tensor, or a list of them for concatenated states), detached and copied."""
    return [item.detach().clone() for item in value] if isinstance(value, list) else value.detach().clone()


def _numpy_state() -> dict[str, Any]:
    # The legacy global generator is saved because user code (and libraries) may still draw from it.
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "name": name,
        "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["position"], state["has_gauss"], state["cached"]))  # noqa: NPY002


def _literal(text: str) -> Any:
    import ast

    return ast.literal_eval(text)
