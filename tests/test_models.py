"""Model.fit / evaluate / checkpoints: resume after a stop gives the same numbers; files are verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from twotower import BatchTopKAccuracy, BruteForce, FactorizedTopK, LossMean, Retrieval
from twotower.data.synthetic import make_synthetic_interactions
from twotower.models import CheckpointError, Model, latest_checkpoint
from twotower.workload import Batches


class TinyModel(Model):
    def __init__(self, num_users: int, num_items: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.users = nn.Embedding(num_users, 8)
        self.items = nn.Embedding(num_items, 8)
        nn.init.uniform_(self.users.weight, -0.05, 0.05)
        nn.init.uniform_(self.items.weight, -0.05, 0.05)
        corpus = BruteForce(k=10)
        self.num_items = num_items
        self.task = Retrieval(
            metrics=FactorizedTopK(corpus.index(self.items.weight.detach()), ks=(1, 10)),
            batch_metrics=[BatchTopKAccuracy()],
            loss_metrics=[LossMean()],
        )
        self.factorized_calls = 0

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        users, items = batch
        if not training:
            self.task.factorized_metrics[0].index.index(self.items.weight.detach())  # type: ignore[union-attr]
        loss: torch.Tensor = self.task(self.users(users), self.items(items), candidate_ids=items)
        return loss

    def regularization_loss(self) -> torch.Tensor:
        return 1e-3 * self.users.weight.square().sum()


def _setup(seed: int = 0, model_seed: int = 0) -> tuple[TinyModel, torch.optim.Optimizer, Batches, Batches]:
    data = make_synthetic_interactions(num_users=400, num_items=300, interactions_per_user=30, seed=seed)
    model = TinyModel(data.num_users, data.num_items, model_seed)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.1, eps=1e-7)
    train = Batches(data.train_users, data.train_items, batch_size=256, shuffle=True, seed=seed)
    test = Batches(data.test_users, data.test_items, batch_size=512, shuffle=False)
    return model, optimizer, train, test


def test_fit_reports_tfrs_names_and_learns() -> None:
    model, optimizer, train, test = _setup()
    before = model.evaluate(test, progress=False)
    history = model.fit(train, optimizer, epochs=4, progress=False)
    after = model.evaluate(test, progress=False)
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0]
    for name in ("loss", "regularization_loss", "total_loss", "batch_top_1_categorical_accuracy", "loss_mean"):
        assert name in history[-1]
    assert history[-1]["total_loss"] == pytest.approx(history[-1]["loss"] + history[-1]["regularization_loss"])
    # Factorized metrics are off while training (never updated): the history leaves them out rather than
    # reporting 0.0 for a number nobody computed; evaluating computes them.
    assert not any(name.startswith("factorized_top_k/") for row in history for name in row)
    assert (
        after["factorized_top_k/top_10_categorical_accuracy"]
        > before["factorized_top_k/top_10_categorical_accuracy"] + 0.05
    )
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_after_a_stop_gives_the_same_numbers(tmp_path: Path) -> None:
    straight, optimizer, train, test = _setup()
    expected = straight.fit(train, optimizer, epochs=3, checkpoint_dir=tmp_path / "straight", progress=False)

    stopped, optimizer, train, _ = _setup()
    stopped.fit(train, optimizer, epochs=1, checkpoint_dir=tmp_path / "stopped", progress=False)
    # A new process: fresh objects, different initial weights and RNG, then resume from the checkpoint.
    torch.manual_seed(1234)
    resumed, optimizer, train, _ = _setup(model_seed=99)
    history = resumed.fit(train, optimizer, epochs=3, checkpoint_dir=tmp_path / "stopped", progress=False)
    assert history == expected
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert latest_checkpoint(tmp_path / "stopped") == tmp_path / "stopped" / "checkpoint-epoch0003.pt"
    assert straight.evaluate(test, progress=False) == resumed.evaluate(test, progress=False)


class KilledError(Exception):
    """Stands for the process being killed: raised from inside a training step."""


def test_a_run_killed_mid_epoch_resumes_on_the_next_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, optimizer, train, _test = _setup()
    expected = straight.fit(train, optimizer, epochs=2, progress=False)
    steps_per_epoch = len(train)

    killed, optimizer, train, _ = _setup()
    calls = {"n": 0}
    original = Model.train_step

    def dies_at_step(self: Model, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 8:  # in epoch 2, after the checkpoint of its step 5
            raise KilledError
        return original(self, batch, optimizer)

    monkeypatch.setattr(Model, "train_step", dies_at_step)
    with pytest.raises(KilledError):
        killed.fit(train, optimizer, epochs=2, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    monkeypatch.setattr(Model, "train_step", original)
    # Only the newest mid-epoch checkpoint is kept, beside the epoch's.
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == [
        "checkpoint-epoch0001.pt", "checkpoint-epoch0002-step00000005.pt"
    ]  # fmt: skip
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch0002-step00000005.pt"

    torch.manual_seed(1234)
    resumed, optimizer, train, _ = _setup(model_seed=99)
    steps = {"n": 0}

    def counted(self: Model, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        steps["n"] += 1
        return original(self, batch, optimizer)

    monkeypatch.setattr(Model, "train_step", counted)
    history = resumed.fit(train, optimizer, epochs=2, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    assert steps["n"] == steps_per_epoch - 5  # the remainder of epoch 2, no batch twice
    # The epoch's means and training metrics include the steps before the kill: the same numbers as straight.
    assert history == pytest.approx(expected, rel=1e-6)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_checkpoint_every_needs_batches_that_tell_their_position(tmp_path: Path) -> None:
    model, optimizer, train, _ = _setup()
    with pytest.raises(ValueError, match="checkpoint_every needs batches that tell their position"):
        model.fit(list(train), optimizer, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
        model.fit(train, optimizer, checkpoint_every=5, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        model.fit(train, optimizer, checkpoint_dir=tmp_path, checkpoint_every=0, progress=False)


def test_batches_resume_an_interrupted_epoch_exactly() -> None:
    rows = torch.arange(1000)
    straight = Batches(rows, batch_size=64, shuffle=True, seed=3)
    first_epoch = [batch[0] for batch in straight]
    second_epoch = [batch[0] for batch in straight]
    interrupted = Batches(rows, batch_size=64, shuffle=True, seed=3)
    for _ in interrupted:
        pass
    iterator = iter(interrupted)
    taken = [next(iterator)[0] for _ in range(6)]
    state = interrupted.state_dict()
    fresh = Batches(rows, batch_size=64, shuffle=True, seed=99)
    fresh.load_state_dict(state)
    rest = [batch[0] for batch in fresh]
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, second_epoch, strict=True))
    assert not torch.equal(first_epoch[0], second_epoch[0])
    # Without a loaded position every iteration is a new epoch, even after an abandoned one.
    again = Batches(rows, batch_size=64, shuffle=True, seed=3)
    next(iter(again))
    assert torch.equal(next(iter(again))[0], second_epoch[0])
    with pytest.raises(ValueError, match="saved for 1000 rows in batches of 64"):
        Batches(torch.arange(999), batch_size=64, shuffle=True).load_state_dict(state)


def test_corrupt_or_unverified_checkpoints_are_refused(tmp_path: Path) -> None:
    model, optimizer, train, _ = _setup()
    model.fit(train, optimizer, epochs=1, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint-epoch0001.pt"
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="corrupt"):
        model.fit(train, optimizer, epochs=2, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "checkpoint-epoch0001.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="no checksum file"):
        model.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        model.load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    model, optimizer, train, _ = _setup()
    model.save_checkpoint(tmp_path / "checkpoint-epoch0001.pt", optimizer, 1, [], train)
    other = TinyModel(500, 300, 0)
    with pytest.raises(CheckpointError, match="does not match this model"):
        other.load_checkpoint(tmp_path / "checkpoint-epoch0001.pt")


def test_bad_arguments() -> None:
    model, optimizer, train, _ = _setup()
    with pytest.raises(ValueError, match="epochs"):
        model.fit(train, optimizer, epochs=0, progress=False)
    with pytest.raises(TypeError, match="optimizer"):
        model.fit(train, "sgd", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batches"):
        model.fit([], optimizer, progress=False)


@pytest.mark.parametrize("damage", ["no_sidecar", "truncated"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path: Path, damage: str) -> None:
    """A kill between writing checkpoint 2 and its sidecar (or mid-write) must not lose the run: resume from 1."""
    straight, optimizer, train, _ = _setup()
    expected = straight.fit(train, optimizer, epochs=3, progress=False)
    stopped, optimizer, train, _ = _setup()
    stopped.fit(train, optimizer, epochs=2, checkpoint_dir=tmp_path, progress=False)
    latest = tmp_path / "checkpoint-epoch0002.pt"
    if damage == "no_sidecar":
        (tmp_path / "checkpoint-epoch0002.pt.sha256").unlink()
    else:
        latest.write_bytes(latest.read_bytes()[:1000])
    torch.manual_seed(1234)
    resumed, optimizer, train, _ = _setup(model_seed=99)
    with pytest.warns(UserWarning, match="skipping a checkpoint that does not verify"):
        history = resumed.fit(train, optimizer, epochs=3, checkpoint_dir=tmp_path, progress=False)
    assert history == expected  # epochs 2 and 3 trained again from checkpoint 1, to the same numbers
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    model, optimizer, train, _ = _setup()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir must be a directory"):
        model.fit(train, optimizer, checkpoint_dir=tmp_path / "file", progress=False)
