"""Feature types: fitting and transforms against hand-computed examples, JSON round trips, bad values refused."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.features import (
    BagFeature,
    FeatureError,
    FeatureSpec,
    IdFeature,
    NumericFeature,
    VectorFeature,
    feature_from_json,
    fit_feature,
    tokenize,
)


def test_id_feature_vocabulary_oov_and_integers_as_text() -> None:
    feature = fit_feature(FeatureSpec("user", "id"), pa.array([3, 1, 2, 2, None]))
    assert isinstance(feature, IdFeature)
    # Sorted values after one OOV row: "1" -> 1, "2" -> 2, "3" -> 3; unknown and missing -> 0.
    assert feature.transform(["2", 3, 9, None])["user"].tolist() == [2, 3, 0, 0]
    assert feature.inputs()[0].rows == 4


def test_id_feature_min_count_and_hashing() -> None:
    feature = fit_feature(FeatureSpec("shop", "id", min_count=2), ["a", "b", "b", "c", "c", "c"])
    assert feature.transform(["a", "b", "c"])["shop"].tolist() == [0, 1, 2]  # "a" is seen once: OOV
    hashed = fit_feature(FeatureSpec("shop", "id", hash_buckets=7), ["a"])
    rows = hashed.transform(["a", "b", "a"])["shop"].tolist()
    assert rows[0] == rows[2]
    assert all(0 <= row < 7 for row in rows)
    assert hashed.inputs()[0].rows == 7


def test_text_tokenisation_is_keras_standardisation() -> None:
    tokens = tokenize(pa.array(["Toy Story (1995)", "Heat!!", None, "...", "  a  B c "]), bigrams=True)
    assert tokens.to_pylist() == [
        ["toy", "story", "1995", "toy story", "story 1995"],
        ["heat"],
        [],
        [],
        ["a", "b", "c", "a b", "b c"],
    ]


def test_text_feature_vocabulary_by_frequency_and_padding() -> None:
    titles = ["Toy Story", "Story of Us", "Heat", "Heat of the Night"]
    # max_tokens counts padding and the OOV row: 2 + 3 tokens, the most frequent (heat 2, of 2, story 2).
    feature = fit_feature(FeatureSpec("title", "text", max_tokens=5), titles)
    assert isinstance(feature, BagFeature)
    assert feature.vocabulary.known_values() == ["heat", "of", "story"]
    assert feature.length == 4  # the longest title's tokens
    assert feature.summary() == "title (text: 5 rows)"  # padding, OOV and 3 tokens
    rows = feature.transform(["story of toy", "", None])["title"].tolist()
    # Row 0 padding; OOV 1; heat 2, of 3, story 4.
    assert rows == [[4, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_text_feature_refuses_numbers() -> None:
    with pytest.raises(FeatureError, match=r"feature 'title' \(text\): column 'title' must hold strings, got int64"):
        fit_feature(FeatureSpec("title", "text"), pa.array([1, 2]))


def test_multi_feature_from_strings_and_lists() -> None:
    feature = fit_feature(FeatureSpec("genres", "multi"), ["Drama|Comedy", "Comedy", None])
    # Rows: padding 0, OOV 1, Comedy 2, Drama 3.
    assert feature.transform(["Comedy|Drama", "Horror", "", None])["genres"].tolist() == [
        [2, 3],
        [1, 0],
        [0, 0],
        [0, 0],
    ]
    listed = fit_feature(FeatureSpec("tags", "multi", max_length=1), pa.array([["x", "y"], ["y"]]))
    assert listed.transform(pa.array([["y", "x"]]))["tags"].tolist() == [[3]]  # cut at max_length
    with pytest.raises(FeatureError, match="must hold lists or '\\|'-separated strings"):
        fit_feature(FeatureSpec("genres", "multi"), pa.array([1.5]))


def test_timestamp_feature_buckets_and_standardisation() -> None:
    values = np.array([0, 10, 20, 30, 40], dtype=np.int64)
    feature = fit_feature(FeatureSpec("ts", "timestamp", buckets=5, bucketing="uniform"), values)
    assert isinstance(feature, NumericFeature)
    assert feature.boundaries == [0.0, 10.0, 20.0, 30.0, 40.0]  # linspace(min, max, 5)
    out = feature.transform(pa.array([0, 5, 40, 100, None]))
    # Discretization: bucket i holds boundaries[i-1] <= x < boundaries[i]; 6 rows.
    assert out["ts.bucket"].tolist() == [1, 1, 5, 5, 3]  # a missing value is the median, 20
    std = math.sqrt(200.0)  # population variance of 0..40 step 10
    expected = np.array([-20, -15, 20, 20, 0], dtype=np.float64) / std  # 100 is clipped to the training maximum
    np.testing.assert_allclose(out["ts.value"].numpy(), expected, rtol=1e-6)
    assert feature.inputs()[1].rows == 6
    assert feature.summary() == "ts (timestamp: standardised, 6 rows)"


def test_timestamp_feature_reads_arrow_timestamps_as_seconds() -> None:
    stamps = pa.array([0, 1_000_000, 2_000_000], type=pa.timestamp("us"))
    feature = fit_feature(FeatureSpec("ts", "timestamp", buckets=0), stamps)
    assert feature.mean == pytest.approx(1.0)  # seconds


def test_numeric_feature_quantile_buckets_and_constant_column() -> None:
    feature = fit_feature(FeatureSpec("price", "numeric", buckets=3), [1, 2, 3, 4, 5, 6, 7, 8])
    assert feature.boundaries == pytest.approx(np.quantile(np.arange(1, 9), [0.25, 0.5, 0.75]).tolist())
    constant = fit_feature(FeatureSpec("price", "numeric"), [5.0, 5.0])
    # Keras's Normalization divides by max(std, 1e-7): a constant column gives 0, not NaN.
    assert constant.transform([5.0])["price.value"].tolist() == [0.0]
    with pytest.raises(FeatureError, match=r"column 'price' holds 1 non-finite value\(s\).*row 1"):
        fit_feature(FeatureSpec("price", "numeric"), [1.0, math.nan])
    with pytest.raises(FeatureError, match="must hold numbers, got large_string"):
        fit_feature(FeatureSpec("price", "numeric"), pa.array(["1"], type=pa.large_string()))


def test_vector_feature() -> None:
    feature = fit_feature(FeatureSpec("emb", "vector"), [[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(feature, VectorFeature)
    assert feature.transform([[0.5, 1.5], None])["emb"].tolist() == [[0.5, 1.5], [0.0, 0.0]]
    with pytest.raises(FeatureError, match="row 0 of column 'emb' holds 3 numbers, expected 2"):
        feature.transform([[1.0, 2.0, 3.0]])
    with pytest.raises(FeatureError, match="lists of one length"):
        fit_feature(FeatureSpec("emb", "vector"), [[1.0], [1.0, 2.0]])


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        (FeatureSpec("u", "id", oov_buckets=3), ["a", "b"]),
        (FeatureSpec("t", "text", bigrams=True), ["a b", "c"]),
        (FeatureSpec("g", "multi", separator=","), ["a,b", "c"]),
        (FeatureSpec("n", "numeric", buckets=2), [1.0, 2.0, 3.0]),
        (FeatureSpec("ts", "timestamp"), [10, 20, 30]),
        (FeatureSpec("v", "vector"), [[1.0, 2.0]]),
    ],
)
def test_saved_features_transform_identically(spec: FeatureSpec, values: list[object]) -> None:
    feature = fit_feature(spec, values)
    loaded = feature_from_json(feature.to_json())
    assert loaded == feature
    for name, tensor in feature.transform(values).items():
        assert torch.equal(loaded.transform(values)[name], tensor)


def test_malformed_saved_features_are_refused() -> None:
    good = fit_feature(FeatureSpec("n", "numeric", buckets=2), [1.0, 2.0, 3.0]).to_json()
    with pytest.raises(FeatureError, match="unsorted bucket boundaries"):
        feature_from_json({**good, "state": {**good["state"], "boundaries": [2.0, 1.0]}})
    with pytest.raises(FeatureError, match="unknown fields"):
        feature_from_json({**good, "spec": {**good["spec"], "code": "import os"}})
    with pytest.raises(FeatureError, match="saved state is malformed"):
        feature_from_json({**good, "state": {}})


def test_bad_specs_name_the_feature() -> None:
    with pytest.raises(FeatureError, match=r"\[query.features\]: feature 'x' has unknown type 'vec'"):
        FeatureSpec.from_config("x", {"type": "vec"}, "[query.features]")
    with pytest.raises(FeatureError, match=r"\[query.features\]: feature 'x': unknown feature type 'vec'"):
        FeatureSpec.from_config("x", "vec", "[query.features]")
    with pytest.raises(FeatureError, match=r"feature 'x' \(id\) takes no \['buckets'\]"):
        FeatureSpec.from_config("x", {"type": "id", "buckets": 3}, "[query.features]")
    with pytest.raises(FeatureError, match="default 'now' is for timestamp features only"):
        FeatureSpec("x", "numeric", default="now")
