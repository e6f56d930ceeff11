"""The MovieLens reference workload and its CLI, end to end on the local data copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.cli import main
from twotower.serving import Bundle, load_bundle
from twotower.vocabulary import Vocabulary
from twotower.workload import PUBLISHED, BasicRetrievalModel, Batches, WorkloadConfig, keras_adagrad

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "ml-100k").is_dir(), reason=f"no local MovieLens copy at {SHARED}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quickstart run through the CLI, shared by the tests of this module."""
    directory = tmp_path_factory.mktemp("run") / "quickstart"
    code = main(["quickstart", "--data-dir", str(SHARED), "--run-dir", str(directory), "--no-progress"])
    assert code == 0
    return directory


def _bundle(run_dir: Path) -> Bundle:
    return load_bundle(run_dir / "bundle")


def test_quickstart_reproduces_the_tutorial(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart is a pipeline run with the tutorial's settings (its config.toml says so)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = (run_dir / "config.toml").read_text()
    for setting in ('interactions = "movielens:100k"', 'split = "random"', "logq = false", "embedding_dim = 32"):
        assert setting in config
    test, untrained = metrics["test"], metrics["untrained"]
    top100 = "factorized_top_k/top_100_categorical_accuracy"
    # Untrained towers rank at random: about 100 / 1664 = 0.06. The tutorial reaches 0.2334.
    assert untrained[top100] < 0.09
    assert test[top100] > untrained[top100] + 0.12
    assert test[top100] > PUBLISHED[100] - 0.02
    assert [round(row["epoch"]) for row in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    for k in (10, 50, 100):
        assert 0 < test[f"model/recall@{k}"] <= 1
        assert 0 < test[f"popularity/recall@{k}"] <= 1
    assert test["model/recall@100"] > test["model/recall@10"]
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommend_excludes_seen_titles(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle(run_dir)
    seen = set(bundle.seen["42"])
    answer = bundle.recommend("42", k=20)
    assert len(answer) == 20
    assert not seen & {title for title, _ in answer}
    scores = [score for _, score in answer]
    assert scores == sorted(scores, reverse=True)
    with_seen = bundle.recommend("42", k=20, exclude_seen=False)
    assert seen & {title for title, _ in with_seen}
    assert main(["recommend", "--run", str(run_dir), "--user", "42", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip("\n").splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("  1. ")


def test_unknown_user_gets_the_training_popularity_ranking(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Counted by hand from the run's own seen.json (every training interaction, per user).
    import json
    from collections import Counter

    seen = json.loads((run_dir / "bundle" / "seen.json").read_text())
    counts = Counter(title for titles in seen.values() for title in titles)
    assert main(["recommend", "--run", str(run_dir), "--user", "99999", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip("\n").splitlines()
    assert "is not in the run: the most popular training items" in lines[0]
    assert len(lines) == 6
    expected_counts = sorted(counts.values(), reverse=True)[:5]
    for line, count in zip(lines[1:], expected_counts, strict=True):
        assert line.endswith(f"({float(count):.3f})")
        title = line.split(". ", 1)[1].rsplit("  (", 1)[0]
        assert counts[title] == count


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupt", "is corrupt or was modified: its SHA-256 does not match the manifest"),
        ("no_manifest", "has no manifest.json"),
        ("missing_file", "is incomplete: plot.png is missing"),
    ],
)
def test_damaged_runs_are_refused(
    run_dir: Path, tmp_path: Path, damage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    if damage == "corrupt":
        with (copy / "model.safetensors").open("r+b") as handle:
            handle.seek(200)
            handle.write(b"\x00\x01\x02")
    elif damage == "no_manifest":
        (copy / "manifest.json").unlink()
    else:
        (copy / "plot.png").unlink()
    assert main(["recommend", "--run", str(copy), "--user", "1"]) == 1
    assert message in capsys.readouterr().err


def test_cli_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--run", str(tmp_path / "nothing"), "--user", "1"]) == 1
    assert "no run directory" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run_dir), "--user", "99999", "--unknown-users", "error"]) == 1
    assert "unknown user id '99999'" in capsys.readouterr().err
    assert main(["quickstart", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "r")]) == 1
    assert "holds neither ml-100k/ nor ml-100k.zip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quickstart", "--batch-size", "-3"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        WorkloadConfig(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        WorkloadConfig(learning_rate=-0.1)
    with pytest.raises(ValueError, match="precision must be 'float32' or 'bf16', got 'half'"):
        WorkloadConfig(precision="half")  # type: ignore[arg-type]


def test_bf16_model_runs_its_loss_products_in_bf16() -> None:
    """BasicRetrievalModel(precision="bf16") hands the precision to its task: the task's logits are bf16 values
    widened to float32 (a float32 task's are not)."""
    users, titles = Vocabulary([str(i) for i in range(20)]), Vocabulary([f"t{i}" for i in range(30)])
    torch.manual_seed(0)
    model = BasicRetrievalModel(users, titles, 16, precision="bf16")
    queries, candidates = model.user_model(torch.arange(1, 9)), model.movie_model(torch.arange(1, 9))
    logits, _ = model.task.compute_logits(queries.detach(), candidates.detach())
    assert torch.equal(logits.bfloat16().float(), logits)
    float_logits, _ = BasicRetrievalModel(users, titles, 16).task.compute_logits(queries.detach(), candidates.detach())
    assert not torch.equal(float_logits.bfloat16().float(), float_logits)


def test_torchrun_two_processes_match_one(run_dir: Path, tmp_path: Path) -> None:
    """`twotower train` under torchrun with 2 gloo processes: same global batches, shared negatives."""
    import os
    import subprocess
    import sys

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TWOTOWER_DATA_DIR": str(SHARED)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "twotower", "train",
               "--run-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "trained on 2 processes" in completed.stdout
    two = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    one = json.loads((run_dir / "metrics.json").read_text())["test"]
    # The same computation up to the order of float sums: far inside the seed spread (std 0.002 at top-100).
    for name in ("factorized_top_k/top_10_categorical_accuracy", "factorized_top_k/top_100_categorical_accuracy",
                 "model/recall@100", "model/ndcg@100"):  # fmt: skip
        assert two[name] == pytest.approx(one[name], abs=2e-3), name


def test_the_run_serves_its_bundle_over_http(run_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from twotower.serving import create_app, load_bundle

    client = TestClient(create_app(load_bundle(run_dir / "bundle")))
    assert client.get("/healthz").json()["candidates"] == 1664
    response = client.post("/recommend", json={"user_id": "42", "k": 10})
    assert response.status_code == 200
    expected = _bundle(run_dir).recommend("42", k=10)
    assert [(item["id"], item["score"]) for item in response.json()["items"]] == list(expected)


def test_keras_adagrad_steps_as_keras() -> None:
    """Three steps of Keras's Adagrad by hand: accumulator from 0.1, += g^2; w -= lr * g / (sqrt(acc) + 1e-7)."""
    rng = np.random.default_rng(4)
    start = rng.normal(size=(6, 3))
    tables = [torch.nn.Parameter(torch.tensor(start, dtype=torch.float32)) for _ in range(2)]
    optimizer = keras_adagrad(tables, learning_rate=0.05)
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4):
        assert optimizer.defaults["fused"] is True
    weights, accumulator = start.copy(), np.full_like(start, 0.1)
    for _ in range(3):
        gradient = rng.normal(size=start.shape)
        for table in tables:
            table.grad = torch.tensor(gradient, dtype=torch.float32)
        optimizer.step()
        accumulator += gradient**2
        weights -= 0.05 * gradient / (np.sqrt(accumulator) + 1e-7)
    for table in tables:
        np.testing.assert_allclose(table.detach().numpy(), weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_follow_the_seeded_permutation(shuffle: bool) -> None:
    """Each epoch draws one permutation from the seeded generator; batches are its consecutive slices (the last
    one short), for every aligned tensor."""
    users, items = torch.arange(10) * 10, torch.arange(10) * 100
    batches = Batches(users, items, batch_size=4, shuffle=shuffle, seed=7)
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        order = torch.randperm(10, generator=generator) if shuffle else torch.arange(10)
        got = list(batches)
        assert [batch[0].shape[0] for batch in got] == [4, 4, 2]
        assert torch.equal(torch.cat([batch[0] for batch in got]), order * 10)
        assert torch.equal(torch.cat([batch[1] for batch in got]), order * 100)


def test_keras_adagrad_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0\.1"):
        keras_adagrad([torch.nn.Parameter(torch.zeros(2))], learning_rate=-0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        keras_adagrad([], learning_rate=0.1)


def test_the_quickstart_run_re_evaluates_as_any_pipeline_run(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`twotower evaluate` reads MovieLens again, splits it as the run did and finds the saved numbers."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    saved = json.loads((copy / "metrics.json").read_text())["test"]
    monkeypatch.setenv("TWOTOWER_DATA_DIR", str(SHARED))
    assert main(["evaluate", "--run", str(copy)]) == 0
    again = json.loads((copy / "metrics.json").read_text())
    for name in ("model/recall@100", "popularity/recall@100", "factorized_top_k/top_100_categorical_accuracy"):
        assert again["test"][name] == pytest.approx(saved[name], abs=1e-6), name
    assert again["untrained"] == json.loads((run_dir / "metrics.json").read_text())["untrained"]
