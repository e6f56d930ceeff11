"""Featurized pipeline runs: features from the log, a user table and a catalogue; saved runs and bundles that give
bit-identical scores; serving with and without context; bad feature configs refused with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from test_pipeline import _write_csv
from twotower.cli import main
from twotower.features import FeatureSpec, transform_all
from twotower.indexes import AnisotropicIVF
from twotower.pipeline import load_pipeline_run
from twotower.pipeline.config import ConfigError, PipelineConfig, load_config, make_config
from twotower.pipeline.features import build_tower_inputs
from twotower.pipeline.runs import evaluate_run, item_id_index
from twotower.pipeline.training import build_model, load_interactions, prepare
from twotower.serving import load_bundle

CLUSTERS = 6
NEW_USER = "C9000"  # in the user table (segment 2), never in the log


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log where user u likes the items of cluster u % 6; the user table gives each user's segment (its
    cluster), the catalogue each item's title words, genres, price and a vector, all telling its cluster."""
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    items, users = 120, 180
    rows = []
    for user in range(users):
        for event in range(16):
            cluster = user % CLUSTERS if rng.random() < 0.9 else int(rng.integers(0, CLUSTERS))
            item = int(rng.integers(0, items // CLUSTERS)) * CLUSTERS + cluster
            rows.append({"customer": f"C{user:04d}", "sku": f"S{item}", "ts": 1_500_000_000_000 + 3_600_000 * event,
                         "device": "app" if rng.random() < 0.5 else "web"})  # fmt: skip
    _write_csv(folder / "events.csv", rows)
    table = [{"customer": f"C{user:04d}", "segment": f"seg{user % CLUSTERS}"} for user in range(users)]
    table.append({"customer": NEW_USER, "segment": "seg2"})
    _write_csv(folder / "users.csv", table)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    catalogue = [
        {"sku": f"S{item}", "title": f"The {words[item % CLUSTERS]} thing no. {item}",
         "genres": f"G{item % CLUSTERS}|all", "price": 10.0 + item % CLUSTERS}
        for item in range(items)
    ]  # fmt: skip
    _write_csv(folder / "items.csv", catalogue)
    (folder / "shop.toml").write_text(
        """
[data]
interactions = "events.csv"
user_col = "customer"
item_col = "sku"
time_col = "ts"
items = "items.csv"
item_title_col = "title"
users = "users.csv"

[split]
split = "last-n"
last_n = 2
validation_fraction = 0.0

[model]
embedding_dim = 16
layer_sizes = [32, 16]

[training]
epochs = 12
batch_size = 256
patience = 0

[query.features]
customer = "id"
segment = "id"
ts = { type = "timestamp", buckets = 10 }
device = "id"

[candidate.features]
sku = "id"
title = { type = "text", bigrams = true }
genres = "multi"
price = { type = "numeric", buckets = 3 }
"""
    )
    return folder


@pytest.fixture(scope="module")
def run(shop: Path) -> Path:
    out = shop / "run"
    assert main(["train", "--config", str(shop / "shop.toml"), "--no-progress", "--out", str(out)]) == 0
    return out


def test_featurized_run_beats_popularity_and_keeps_its_features(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["model/recall@10"] > 1.5 * test["popularity/recall@10"]
    described = json.loads((run / "features.json").read_text())
    assert [f["spec"]["name"] for f in described["query"]["features"]] == ["customer", "segment", "ts", "device"]
    assert [f["spec"]["type"] for f in described["candidate"]["features"]] == ["id", "text", "multi", "numeric"]
    # The text vocabulary was fitted on the catalogue's titles (lower-cased, punctuation gone, with bigrams).
    title = described["candidate"]["features"][1]["state"]["vocabulary"]["values"]
    assert "alpha" in title
    assert "the alpha" in title
    assert "no." not in title
    assert "no" in title
    config = load_config(run / "config.toml")
    assert [spec.name for spec in config.query_features] == ["customer", "segment", "ts", "device"]
    assert config.candidate_features[1] == FeatureSpec("title", "text", bigrams=True)


def test_saved_run_and_bundle_give_bit_identical_scores(run: Path) -> None:
    saved = json.loads((run / "metrics.json").read_text())["test"]
    again = evaluate_run(run, say=lambda line: None)
    assert again == saved  # the saved preprocessing applied again to the data: the same ranking, exactly

    loaded = load_pipeline_run(run)
    towers: Any = loaded.model
    config = loaded.config
    # The towers rebuilt from the run, fed by the run's saved preprocessing applied to the data again.
    interactions = load_interactions(config)
    prepared = prepare(config, interactions)
    fitted = (towers["query_tower"].features, towers["candidate_tower"].features)
    model = build_model(config, prepared, build_tower_inputs(config, interactions, prepared, fitted=fitted))
    model.load_state_dict(towers.state_dict())
    bundle = load_bundle(run / "bundle")
    corpus = bundle.index.snapshot().candidates  # type: ignore[attr-defined]
    assert torch.equal(model.corpus_embeddings(), corpus)  # the bundle's index holds exactly these
    # A request through the bundle's preprocessing and the same query by hand (the user table says seg3).
    context = {"ts": 1_500_000_000 + 7_200, "device": "web"}
    by_hand = transform_all(fitted[0], {"customer": ["C0003"], "segment": ["seg3"], "ts": [context["ts"]],
                                         "device": ["web"]})  # fmt: skip
    request = bundle.query_features.inputs([("C0003", context)])  # type: ignore[union-attr]
    assert by_hand.keys() == request.keys()
    assert all(torch.equal(by_hand[key], request[key]) for key in by_hand)
    with torch.no_grad():
        query = bundle.tower(request).double()
        assert torch.equal(bundle.tower(request), model.query_tower(by_hand))
    scores = (query @ corpus.double().T)[0]
    ids = prepared.items.known_values()
    answer = bundle.recommend("C0003", k=5, exclude_seen=False, context=context)
    assert [item for item, _ in answer] == [ids[int(row)] for row in torch.argsort(scores, descending=True)[:5]]
    for item, score in answer:
        assert score == pytest.approx(float(scores[ids.index(item)]), rel=1e-6)
    # An approximate serving index is tuned on the queries of training interactions, context included.
    approximate = item_id_index(model, prepared, config.replace(serving_index="approximate", serving_target_recall=1.0))
    assert isinstance(approximate, AnisotropicIVF)
    found = approximate.search(query.float(), k=5)
    assert [ids[int(row)] for row in torch.argsort(scores, descending=True)[:5]] == list(np.asarray(found.ids)[0])


def test_serving_with_and_without_context(run: Path) -> None:
    bundle = load_bundle(run / "bundle")
    assert bundle.query_features is not None
    assert bundle.query_features.context_columns == ["device", "ts"]
    median = bundle.query_features.features[2].median  # type: ignore[attr-defined]
    # Left out, the time takes the training median and the device its OOV row: as if given so.
    assert bundle.recommend("C0004", k=10) == bundle.recommend("C0004", k=10, context={"ts": median})
    later = bundle.recommend("C0004", k=10, context={"ts": median + 40 * 3600, "device": "app"})
    assert [score for _, score in later] != [score for _, score in bundle.recommend("C0004", k=10)]
    # A user the log never saw, but the user table places in segment 2: cluster-2 items from the segment.
    new = bundle.recommend(NEW_USER, k=10)
    assert new.source == "features"
    assert sum(int(item[1:]) % CLUSTERS == 2 for item, _ in new) >= 8, new
    # Popularity instead, when asked for: the training counts' order, whatever the features say.
    popular = load_bundle(run / "bundle", unknown_queries="popularity").recommend(NEW_USER, k=3)
    assert popular.source == "popularity"
    assert list(popular) == [(item, count) for item, count in bundle.popularity[:3]]
    with pytest.raises(ValueError, match=r"context: context names \['colour'\], which no query feature reads"):
        bundle.recommend("C0004", context={"colour": "red"})
    with pytest.raises(ValueError, match="column 'ts' must hold numbers"):
        bundle.recommend("C0004", context={"ts": "noon"})


def test_http_context(run: Path) -> None:
    from fastapi.testclient import TestClient

    from twotower.serving import create_app

    bundle = load_bundle(run / "bundle")
    with TestClient(create_app(bundle)) as client:
        answer = client.post("/recommend", json={"user_id": "C0004", "k": 3, "context": {"ts": 1_500_003_600}})
        assert answer.status_code == 200
        expected = bundle.recommend("C0004", k=3, context={"ts": 1_500_003_600})
        assert [item["id"] for item in answer.json()["items"]] == [item for item, _ in expected]
        refused = client.post("/recommend", json={"user_id": "C0004", "context": {"secret-value": 1}})
        assert refused.status_code == 422
        assert "secret-value" not in refused.text
        assert "['device', 'ts']" in refused.json()["detail"]


def test_bad_feature_configs_get_one_line(shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = (shop / "shop.toml").read_text().replace('"events.csv"', f'"{shop / "events.csv"}"')
    base = base.replace('"items.csv"', f'"{shop / "items.csv"}"').replace('"users.csv"', f'"{shop / "users.csv"}"')

    def refused(change: tuple[str, str], message: str) -> None:
        assert change[0] in base
        path = tmp_path / "bad.toml"
        path.write_text(base.replace(*change))
        capsys.readouterr()
        assert main(["train", "--config", str(path), "--no-progress", "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("twotower train: error: "), err
        assert message in err, err
        assert not (tmp_path / "out").exists()

    unknown = "[query.features]: feature 'device': unknown feature type 'categorical'; the types are ['id', "
    refused(('device = "id"', 'device = "categorical"'), unknown)
    refused(('device = "id"', 'colour = "id"'), "has no column 'colour' (asked for by context_cols ('colour'))")
    refused(('genres = "multi"', 'genres = { type = "text", column = "price" }'),
            "feature 'genres' (text): column 'price' must hold strings, got double")  # fmt: skip
    refused(("layer_sizes = [32, 16]", "layer_sizes = [32, 0]"), "layer_sizes must be a list of ints in [1, 65536]")


def test_config_round_trip_and_errors() -> None:
    config = make_config(
        {"query_features": {"u": "id", "t": {"type": "timestamp", "buckets": 7}}, "layer_sizes": [8, 4]}
    )
    assert config.featurized
    assert config.query_features[1].buckets == 7
    import tomllib

    from twotower.pipeline.config import _flatten

    assert make_config(_flatten(tomllib.loads(config.to_toml()), "x")) == config
    assert not PipelineConfig().featurized
    with pytest.raises(ConfigError, match="sparse_embeddings is for id towers"):
        make_config({"layer_sizes": [8], "sparse_embeddings": True})
    with pytest.raises(ConfigError, match=r"\[candidate.features\]: feature 'g' \(multi\) takes no \['bigrams'\]"):
        make_config({"candidate_features": {"g": {"type": "multi", "bigrams": True}}})


def test_recommend_command_takes_context(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = load_bundle(run / "bundle")
    capsys.readouterr()
    argv = ["recommend", "--run", str(run), "--user", "C0004", "-k", "3"]
    assert main([*argv, "--context", "ts=1500036000", "--context", "device=app"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = bundle.recommend("C0004", k=3, context={"ts": 1_500_036_000, "device": "app"})
    assert [line.rsplit("[", 1)[1].split("]")[0] for line in printed] == [item for item, _ in expected]
    assert main([*argv, "--context", "colour=red"]) == 1
    assert "context names ['colour'], which no query feature reads" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run), "--user", "C7777", "-k", "3"]) == 0
    assert "answered by the query tower from the other features" in capsys.readouterr().out


def test_features_policy_needs_a_feature_tower() -> None:
    from torch import nn

    from twotower.indexes import BruteForce
    from twotower.serving import Bundle
    from twotower.vocabulary import Vocabulary

    index = BruteForce(k=2).index(torch.eye(2), ["x", "y"])
    tower = nn.Sequential(nn.Embedding(2, 2))
    assert Bundle(tower, index, Vocabulary(["a"]), {}, {}).unknown_queries == "popularity"  # auto, for an id tower
    with pytest.raises(ValueError, match="'features' needs a feature tower that reads more than the user id"):
        Bundle(tower, index, Vocabulary(["a"]), {}, {}, unknown_queries="features")


def test_towers_of_different_widths_and_clashing_context_columns_are_refused() -> None:
    import pyarrow as pa

    from twotower.data.interactions import Interactions
    from twotower.features import FeatureTower, fit_feature
    from twotower.pipeline.features import TowerInputs
    from twotower.pipeline.model import FeatureRetrievalModel

    users = fit_feature(FeatureSpec("u", "id"), ["a", "b"])
    items = fit_feature(FeatureSpec("i", "id"), ["x", "y"])
    inputs = TowerInputs([users], [items], np.zeros(2, dtype=np.int32), item_inputs=items.transform(["x", "x", "y"]))
    with pytest.raises(ValueError, match=r"the towers' outputs differ in width \(query 4, candidate 8\)"):
        FeatureRetrievalModel(FeatureTower([users], 4), FeatureTower([items], 8), inputs)
    log = pa.table({"u": ["a", "b"], "i": ["x", "y"], "ts": [1, 2]})
    with pytest.raises(ValueError, match=r"context_cols must be distinct and name none of the id, time and weight"):
        Interactions.from_arrow(log, "u", "i", time_col="ts", context_cols=["ts"])
    with pytest.raises(ValueError, match="context_cols must be distinct"):
        Interactions.from_arrow(log, "u", "i", context_cols=["ts", "ts"])
