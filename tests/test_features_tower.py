"""FeatureTower: the forward pass against numpy by hand, Keras's initialisers, saving as data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from twotower.features import FeatureError, FeatureSpec, FeatureTower, build_feature_tower, fit_feature, transform_all


def _features() -> list:  # type: ignore[type-arg]
    return [
        fit_feature(FeatureSpec("user", "id"), ["u1", "u2", "u3"]),
        fit_feature(FeatureSpec("title", "text"), ["red fish", "blue fish", "one fish two fish"]),
        fit_feature(FeatureSpec("ts", "timestamp", buckets=3, dim=2, bucketing="uniform"), [0, 50, 100]),
    ]


COLUMNS = {"user": ["u2", "zz"], "title": ["blue fish fish", "nothing known"], "ts": [75, 0]}


def test_forward_is_the_concatenation_through_the_dense_layers() -> None:
    features = _features()
    torch.manual_seed(0)
    tower = FeatureTower(features, embedding_dim=4, layer_sizes=[5, 3], normalize=True)
    inputs = transform_all(features, COLUMNS)
    got = tower(inputs).detach().numpy().astype(np.float64)

    weights = {name: value.detach().numpy().astype(np.float64) for name, value in tower.state_dict().items()}
    user = weights["tables.user.weight"][[2, 0]]  # u2 is row 2; zz is OOV row 0
    title_table = weights["tables.title.weight"]
    vocabulary = features[1].vocabulary.known_values()  # rows: 0 padding, 1 OOV, then these
    row = {token: 2 + position for position, token in enumerate(vocabulary)}
    blue = title_table[[row["blue"], row["fish"], row["fish"]]].mean(axis=0)
    unknown = title_table[[1, 1]].mean(axis=0)  # two OOV tokens: the OOV row (padding is never averaged)
    stamps = weights["tables.ts__bucket.weight"][[2, 1]]  # 75 is in [50, 100): bucket 2; 0 in [0, 50): 1
    value = (np.array([75.0, 0.0]) - 50.0) / math.sqrt(np.var([0.0, 50.0, 100.0]))
    concatenated = np.concatenate([user, np.stack([blue, unknown]), value[:, None], stamps], axis=1)
    hidden = np.maximum(concatenated @ weights["dense.0.weight"].T + weights["dense.0.bias"], 0.0)
    output = hidden @ weights["dense.2.weight"].T + weights["dense.2.bias"]
    output /= np.linalg.norm(output, axis=1, keepdims=True)
    np.testing.assert_allclose(got, output, rtol=1e-5, atol=1e-6)
    assert tower.input_width == 4 + 4 + 1 + 2


@torch.no_grad()
def test_keras_initialisers() -> None:
    torch.manual_seed(0)
    tower = FeatureTower(_features(), embedding_dim=8, layer_sizes=[16])
    assert float(tower.tables["user"].weight.abs().max()) <= 0.05
    assert float(tower.tables["title"].weight[0].abs().max()) == 0.0  # the padding row
    kernel = tower.dense[0].weight
    limit = math.sqrt(6.0 / (kernel.shape[0] + kernel.shape[1]))  # Glorot uniform
    assert float(kernel.abs().max()) <= limit
    assert float(kernel.abs().max()) > 0.8 * limit
    assert float(tower.dense[0].bias.abs().max()) == 0.0


def test_saved_tower_gives_bit_identical_embeddings() -> None:
    features = _features()
    tower = FeatureTower(features, embedding_dim=4, layer_sizes=[3])
    loaded = build_feature_tower(tower.describe(), load(save(tower.state_dict())))
    inputs = transform_all(loaded.features, COLUMNS)
    assert torch.equal(loaded(inputs), tower(transform_all(features, COLUMNS)))


def test_a_tampered_tower_is_refused() -> None:
    tower = FeatureTower(_features(), embedding_dim=4, layer_sizes=[3])
    tensors = dict(tower.state_dict())
    tensors["tables.user.weight"] = torch.zeros(9, 4)
    with pytest.raises(FeatureError, match=r"wrong shape or dtype \['tables.user.weight'\]"):
        build_feature_tower(tower.describe(), tensors)
    with pytest.raises(FeatureError, match="has exactly: features, embedding_dim"):
        build_feature_tower({**tower.describe(), "module": "os.system"}, tower.state_dict())
    with pytest.raises(FeatureError, match="layer_sizes must be a list"):
        build_feature_tower({**tower.describe(), "layer_sizes": "3"}, tower.state_dict())


def test_missing_input_is_named() -> None:
    tower = FeatureTower(_features(), embedding_dim=4)
    inputs = transform_all(tower.features, COLUMNS)
    del inputs["ts.value"]
    with pytest.raises(KeyError, match=r"'ts\.value' is missing"):
        tower(inputs)


def test_a_tower_needs_distinct_features_and_sane_layers() -> None:
    features = _features()
    with pytest.raises(FeatureError, match="a tower needs at least one feature"):
        FeatureTower([], embedding_dim=4)
    with pytest.raises(FeatureError, match=r"distinct names, got \['user', 'user'\]"):
        FeatureTower([features[0], features[0]], embedding_dim=4)
    with pytest.raises(FeatureError, match=r"layer_sizes must hold ints in \[1, 65536\], got \[0\]"):
        FeatureTower(features, embedding_dim=4, layer_sizes=[0])
