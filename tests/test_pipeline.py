"""The own-data pipeline end to end, on small generated logs: ``twotower train / evaluate / recommend`` and Python.

Every number checked here is recomputed independently: popularity's Recall@K from the CSV with plain Python,
seen items from the log, the popularity fallback from a Counter.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.cli import main
from twotower.data import InteractionsError
from twotower.indexes import BruteForce
from twotower.pipeline import (
    PipelineConfig,
    load_config,
    load_pipeline_run,
    make_config,
    save_run,
    train,
)
from twotower.pipeline.runs import RunDirectoryError
from twotower.serving import load_bundle

CLUSTERS = 6


def _rows(users: int = 240, items: int = 180, per_user: int = 24, seed: int = 0) -> list[dict[str, object]]:
    """A learnable log: user u likes the items of cluster u % 6 (90% of its events), popularity within a cluster
    falls as a power law; times in milliseconds increase with each user's events."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items // CLUSTERS + 1) ** 0.8
    weights /= weights.sum()
    rows = []
    for user in range(users):
        cluster = user % CLUSTERS
        for event in range(per_user):
            own = rng.random() < 0.9
            rank = int(rng.choice(weights.shape[0], p=weights))
            item = rank * CLUSTERS + (cluster if own else int(rng.integers(0, CLUSTERS)))
            rows.append({
                "customer": f"C{user:04d}", "sku": f"S{item}", "ts": 1_500_000_000_000 + 60_000 * event
                + int(rng.integers(0, 30_000)), "qty": int(rng.integers(1, 3)),
            })  # fmt: skip
    return rows


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


FAST = ["--epochs", "12", "--batch-size", "512", "--embedding-dim", "16", "--no-progress"]
LAST_3 = ["--split", "last-n", "--last-n", "3", "--validation-fraction", "0", "--patience", "0"]


def _train_flags(log: Path, out: Path) -> list[str]:
    return ["train", "--interactions", str(log), "--user-col", "customer", "--item-col", "sku", "--time-col", "ts",
            *LAST_3, *FAST, "--out", str(out)]  # fmt: skip


def _hand_split(rows: list[dict[str, object]], last: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Training and test items per user for leave-last-``last`` (by time, then row order)."""
    by_user: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for number, row in enumerate(rows):
        by_user[str(row["customer"])].append((int(str(row["ts"])), number, str(row["sku"])))
    train_items, test_items = {}, {}
    for user, events in by_user.items():
        events.sort()
        train_items[user] = [item for _, _, item in events[:-last]]
        test_items[user] = [item for _, _, item in events[-last:]]
    return train_items, test_items


def _popularity_recall_bounds(
    train_items: dict[str, list[str]], test_items: dict[str, list[str]], k: int
) -> tuple[float, float]:
    """Mean per-user Recall@k of "most popular unseen items", with ties at the cut broken worst and best."""
    counts = Counter(item for items in train_items.values() for item in items)
    low, high = [], []
    for user, test_list in test_items.items():
        relevant = set(test_list)  # distinct items; one the user saw in training counts, and is never retrieved
        seen = set(train_items[user])
        ranked = sorted(((count, item) for item, count in counts.items() if item not in seen), reverse=True)
        if len(ranked) > k:
            cut = ranked[k - 1][0]
            sure = {item for count, item in ranked if count > cut}
            tied = {item for count, item in ranked if count == cut}
            slots = k - len(sure)
        else:
            sure, tied, slots = {item for _, item in ranked}, set(), 0
        hits_sure = sum(item in sure for item in relevant)
        hits_tied = sum(item in tied for item in relevant)
        low.append((hits_sure + max(0, hits_tied - (len(tied) - slots))) / len(relevant))
        high.append((hits_sure + min(hits_tied, slots)) / len(relevant))
    return float(np.mean(low)), float(np.mean(high))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, object]]]:
    """A CSV log and the run ``twotower train`` made from it."""
    folder = tmp_path_factory.mktemp("shop")
    rows = _rows()
    log = _write_csv(folder / "events.csv", rows)
    assert main(_train_flags(log, folder / "run")) == 0
    return log, folder / "run", rows


def test_train_beats_popularity_and_reports_it_exactly(shop: tuple[Path, Path, list[dict[str, object]]]) -> None:
    _, run, rows = shop
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    train_items, test_items = _hand_split(rows, 3)
    assert test["model/users"] == len(test_items) == 240
    for k in (10, 50, 100):
        low, high = _popularity_recall_bounds(train_items, test_items, k)
        assert low - 1e-9 <= test[f"popularity/recall@{k}"] <= high + 1e-9, k
    # The users' tastes are learnable and popularity ignores them: the model must be far ahead.
    assert test["model/recall@10"] > 2 * test["popularity/recall@10"]
    assert test["model/recall@50"] > 1.3 * test["popularity/recall@50"]
    assert 0 < test["factorized_top_k/top_100_categorical_accuracy"] <= 1
    # Only what was computed is reported: the history holds the loss per epoch, never a 0.0 placeholder.
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 13))
    assert not any(name.startswith("factorized_top_k/") for row in metrics["history"] for name in row)
    assert metrics["read"]["time_unit"] == "integer milliseconds since 1970"
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommend_excludes_training_items_and_never_lists_minus_infinity(
    shop: tuple[Path, Path, list[dict[str, object]]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, rows = shop
    train_items, _ = _hand_split(rows, 3)
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--user", "C0007", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    shown = [line.split(". ", 1)[1].split("  (")[0] for line in lines]
    assert not set(shown) & set(train_items["C0007"])
    catalogue = {str(row["sku"]) for row in rows}
    assert main(["recommend", "--run", str(run), "--user", "C0007", "-k", "5000"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "inf" not in " ".join(lines)
    assert len(lines) == len(catalogue - set(train_items["C0007"]))


def test_unknown_users_get_popularity_or_the_oov_row_marked_as_such(
    shop: tuple[Path, Path, list[dict[str, object]]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, rows = shop
    train_items, _ = _hand_split(rows, 3)
    counts = Counter(item for items in train_items.values() for item in items)
    bundle = load_bundle(run / "bundle")
    answer = bundle.recommend("nobody", k=4)
    assert answer.source == "popularity"
    assert [score for _, score in answer] == sorted(counts.values(), reverse=True)[:4]
    assert all(counts[item] == score for item, score in answer)
    oov = load_bundle(run / "bundle", unknown_queries="oov").recommend("nobody", k=4)
    assert oov.source == "oov"
    assert len(oov) == 4
    assert load_bundle(run / "bundle").recommend("C0001", k=3).source == "model"
    with pytest.raises(KeyError, match="nobody"):
        load_bundle(run / "bundle", unknown_queries="error").recommend("nobody")
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--user", "nobody", "--unknown-users", "oov"]) == 0
    assert "answered with the out-of-vocabulary row" in capsys.readouterr().out


def test_evaluate_reproduces_the_saved_metrics_and_refuses_changed_data(
    shop: tuple[Path, Path, list[dict[str, object]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    _log, run, rows = shop
    saved = json.loads((run / "metrics.json").read_text())["test"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["evaluate", "--run", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out
    assert "Recall@100" in out
    again = json.loads((copy / "metrics.json").read_text())["test"]
    for name, value in saved.items():
        assert again[name] == pytest.approx(value, rel=1e-6), name
    load_pipeline_run(copy)  # the rewritten run still verifies
    # The data is pinned by SHA-256: a changed log is refused, not silently re-split.
    small = _write_csv(tmp_path / "small.csv", rows[:2400])
    assert main([*_train_flags(small, tmp_path / "small-run"), "--epochs", "1"]) == 0
    with small.open("a") as handle:
        handle.write("C9999,S1,1500000000000,1\n")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "small-run")]) == 1
    assert "changed since it was trained" in capsys.readouterr().err


def test_the_saved_config_reproduces_the_run(
    shop: tuple[Path, Path, list[dict[str, object]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, _ = shop
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0  # fmt: skip
    first = json.loads((run / "metrics.json").read_text())["test"]
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())["test"]
    assert second["model/recall@100"] == pytest.approx(first["model/recall@100"], rel=1e-6)
    assert second["popularity/recall@100"] == first["popularity/recall@100"]
    # Flags override the file.
    assert load_config(run / "config.toml", {"epochs": 2}).epochs == 2
    assert load_config(run / "config.toml").epochs == 12


def test_toml_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "shop.toml").write_text(
        '[data]\ninteractions = "../events.parquet"\nuser_col = "customer"\nitem_col = "sku"\n'
        "[training]\nepochs = 3\nlogq = false\n[evaluation]\nks = [5, 20]\n"
    )
    config = load_config(tmp_path / "conf" / "shop.toml")
    assert config.interactions == str((tmp_path / "events.parquet").resolve())
    assert (config.epochs, config.logq, config.ks, config.split) == (3, False, (5, 20), "time")
    assert load_config(tmp_path / "conf" / "shop.toml").to_toml() == config.to_toml()
    (tmp_path / "bad.toml").write_text("[training]\nepoch = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'epoch' in \\[training\\]"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "misplaced.toml").write_text("[model]\nepochs = 3\n")
    with pytest.raises(ValueError, match="'epochs' belongs in \\[training\\], not \\[model\\]"):
        load_config(tmp_path / "misplaced.toml")
    with pytest.raises(ValueError, match="negatives must be one of \\['in-batch', 'mixed'\\], got 'all'"):
        PipelineConfig(negatives="all")
    with pytest.raises(ValueError, match="epochs must be a int, got '3'"):
        make_config({"epochs": "3"})


def test_python_api_on_parquet_parts_with_mixed_negatives_and_early_stopping(tmp_path: Path) -> None:
    rows = _rows(seed=1)
    table = pa.Table.from_pylist(rows)
    parts = tmp_path / "events"
    parts.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), parts / "part-0.parquet")
    pq.write_table(table.slice(half), parts / "part-1.parquet")
    config = PipelineConfig(
        interactions=str(parts), user_col="customer", item_col="sku", time_col="ts", weight_col="qty",
        split="last-n", last_n=2, validation_fraction=0.1, patience=2, epochs=40, batch_size=512, embedding_dim=16,
        negatives="mixed", num_negatives=64, early_stopping_k=20,
    )  # fmt: skip
    lines: list[str] = []
    trained = train(config, progress=False, say=lines.append)
    scores = [row["val_model/recall@20"] for row in trained.history]
    # Early stopping keeps the best validation epoch and stops `patience` epochs after it.
    assert trained.best_epoch == int(np.argmax(scores)) + 1
    assert len(trained.history) == 40 or len(trained.history) == trained.best_epoch + 2
    test = trained.results["test"]
    assert test["model/recall@10"] > 1.5 * test["popularity/recall@10"]
    assert any("read 5,760 rows" in line for line in lines)
    save_run(tmp_path / "run", trained)
    loaded = load_pipeline_run(tmp_path / "run")
    assert loaded.config == config.replace(interactions=str(parts.resolve()))
    with pytest.raises(RunDirectoryError, match="already holds a run: pass --overwrite"):
        save_run(tmp_path / "run", trained)
    save_run(tmp_path / "run", trained, overwrite=True)


def test_bad_input_gets_one_line_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(users=30, per_user=10)
    log = _write_csv(tmp_path / "events.csv", rows)
    out = tmp_path / "run"

    def refused(argv: list[str], message: str) -> None:
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("twotower train: error: "), err
        assert message in err, err
        assert not out.exists() or (out / "notes.txt").exists()

    flags = _train_flags(log, out)
    refused([*flags[:6], "product", *flags[7:]], "no column 'product' (asked for by item_col); its columns are "
            "['customer', 'sku', 'ts', 'qty']")  # fmt: skip
    (tmp_path / "empty.csv").write_text("")
    refused(_train_flags(tmp_path / "empty.csv", out), "empty.csv is empty")
    (tmp_path / "nulls.csv").write_text("customer,sku,ts\n,a,1\n,b,2\n")
    refused(_train_flags(tmp_path / "nulls.csv", out), "every value of 'customer' is null")
    (tmp_path / "words.csv").write_text("customer,sku,ts\nx,a,monday\ny,b,tuesday\n")
    refused(_train_flags(tmp_path / "words.csv", out), "time column 'ts' is not a time")
    # A time split whose test users are all new (every user's events lie on one side of the cut).
    cold = [dict(row, ts=1_500_000_000 + (0 if int(str(row["customer"])[1:]) < 20 else 10_000_000)) for row in rows]
    cold_log = _write_csv(tmp_path / "cold.csv", cold)
    refused(
        [
            "train",
            "--interactions",
            str(cold_log),
            "--user-col",
            "customer",
            "--item-col",
            "sku",
            "--time-col",
            "ts",
            "--test-from",
            "2017-08-01",
            *FAST,
            "--out",
            str(out),
        ],
        "leaves no test user that training has seen",
    )
    refused([*_train_flags(log, out), "--test-from", "2100-01-01", "--split", "time"], "leaves no test rows")
    # A folder holding something else is never replaced, with or without --overwrite.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(_train_flags(log, out), "holds files that are not a twotower run")
    refused([*_train_flags(log, out), "--overwrite"], "holds files that are not a twotower run")
    assert (out / "notes.txt").read_text() == "mine"


def test_load_interactions_error_is_an_interactions_error(tmp_path: Path) -> None:
    with pytest.raises(InteractionsError, match="no such file or directory"):
        train(PipelineConfig(interactions=str(tmp_path / "absent.csv"), user_col="u", item_col="i"), progress=False,
              say=lambda _: None)  # fmt: skip


def test_train_flags_are_the_config_settings_with_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """Each own-data flag is named after a PipelineConfig setting, sets it, and its help shows its default."""
    import dataclasses

    from twotower.cli import _PIPELINE_FLAGS, build_parser
    from twotower.pipeline import PipelineConfig

    names = {field.name for field in dataclasses.fields(PipelineConfig)}
    assert {setting for setting, _, _ in _PIPELINE_FLAGS} <= names
    args = build_parser().parse_args(["train", "--duplicates", "drop", "--logq", "off", "--last-n", "4"])
    assert (args.duplicates, args.logq, args.last_n, args.split) == ("drop", False, 4, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = PipelineConfig()
    assert f"per user (default {defaults.last_n})" in text
    assert f"negatives per batch with --negatives mixed (default {defaults.num_negatives})" in text
    assert "correction: on or off (default on)" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--split", "stratified"])


def test_sparse_embeddings_train_the_same_model() -> None:
    """--sparse-embeddings on: sparse gradients and Adagrad on the batch's rows only, the same arithmetic as the
    dense tables, so the same weights and test numbers to float32 rounding."""
    import numpy as np
    import pyarrow as pa
    import torch

    from twotower.data import Interactions
    from twotower.pipeline import PipelineConfig, train

    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 60, 3_000), (rng.integers(0, 40, 3_000) + rng.integers(0, 60, 3_000)) % 40
    log = Interactions.from_arrow(pa.table({"u": users, "i": items}), "u", "i")
    runs = []
    for sparse in (False, True):
        config = PipelineConfig(user_col="u", item_col="i", split="random", epochs=3, batch_size=256, patience=0,
                                embedding_dim=16, sparse_embeddings=sparse)  # fmt: skip
        runs.append(train(config, progress=False, say=lambda line: None, interactions=log))
    dense, sparse_run = runs
    assert sparse_run.model.item_embedding.sparse
    assert not dense.model.item_embedding.sparse
    for name in ("user_embedding", "item_embedding"):
        torch.testing.assert_close(
            getattr(sparse_run.model, name).weight, getattr(dense.model, name).weight, rtol=1e-4, atol=1e-5
        )
    for key in ("model/recall@10", "model/recall@100"):
        assert sparse_run.results["test"][key] == pytest.approx(dense.results["test"][key], abs=1e-3)


def test_serving_index_approximate_bundles_a_tuned_anisotropic_index(tmp_path: Path) -> None:
    """--serving-index approximate: the bundle holds an AnisotropicIVF tuned for the target recall on users'
    embeddings; its answers are nearly the exact ranking of the saved model (computed here with numpy)."""
    from twotower.indexes import AnisotropicIVF
    from twotower.pipeline.runs import item_id_index

    rows = _rows(seed=2)
    config = PipelineConfig(
        interactions=str(_write_csv(tmp_path / "events.csv", rows)), user_col="customer", item_col="sku",
        time_col="ts", split="last-n", last_n=2, validation_fraction=0.0, patience=0, epochs=6, batch_size=512,
        embedding_dim=16, serving_index="approximate", serving_target_recall=0.9,
    )  # fmt: skip
    trained = train(config, progress=False, say=lambda line: None)
    index = item_id_index(trained.model, trained.prepared, config)
    assert isinstance(index, AnisotropicIVF)
    assert index.reached_recall is not None
    assert index.reached_recall >= 0.9
    assert isinstance(item_id_index(trained.model, trained.prepared, config.replace(serving_index="auto")), BruteForce)
    save_run(tmp_path / "run", trained)
    bundle = load_bundle(tmp_path / "run" / "bundle")
    assert isinstance(bundle.index, AnisotropicIVF)
    users = trained.model.user_embedding.weight.detach().double().numpy()
    items = trained.model.item_embedding.weight[1:].detach().double().numpy()
    names = np.asarray(trained.prepared.items.values)
    overlap = []
    for user in ["C0001", "C0002", "C0007", "C0100"]:
        row = int(trained.prepared.users.lookup([user])[0])
        exact = set(names[np.argsort(-(items @ users[row]), kind="stable")[:10]].tolist())
        found = {item for item, _ in bundle.recommend(user, k=10, exclude_seen=False)}
        overlap.append(len(found & exact) / 10)
    assert np.mean(overlap) >= 0.8
