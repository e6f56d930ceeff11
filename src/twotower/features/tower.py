"""A tower built from fitted features: each feature's embedding (or value) concatenated, then an MLP, then
optionally L2-normalised, as the TFRS tutorials' ``UserModel``/``MovieModel`` followed by dense layers.

A tower is saved as data (:meth:`FeatureTower.describe` gives JSON; the weights go in safetensors) and rebuilt by
:func:`build_feature_tower` from that JSON with torch's own constructors, every shape checked: loading a tower
runs no code from the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from twotower.features.preprocessing import FeatureError, FittedFeature, InputShape, feature_from_json
from twotower.towers import load_checked_weights

_MAX_LAYERS = 16
_MAX_WIDTH = 1 << 16


class FeatureTower(nn.Module):
    """Features to ``[n, d]`` embeddings.

    Args:
        features: the fitted features, in the order their parts are concatenated.
        embedding_dim: width of every embedding table whose feature gives no ``dim``.
        layer_sizes: the dense layers after the concatenation, ReLU on all but the last (the tutorials' deep
            towers); empty: the concatenation itself is the output (its width is then the output's).
        normalize: L2-normalise the output rows (for a cosine-similarity model with a temperature).
        init_scale: embedding tables start uniform(±init_scale) (Keras's default 0.05); dense layers start Glorot
            uniform with zero bias, as Keras's ``Dense``.

    ``forward(inputs)`` takes ``{input name: tensor}`` as :func:`~twotower.features.transform_all` gives and
    returns ``[n, output_dim]`` ``float32``.
    """

    def __init__(
        self,
        features: Sequence[FittedFeature],
        embedding_dim: int,
        layer_sizes: Sequence[int] = (),
        normalize: bool = False,
        init_scale: float = 0.05,
    ) -> None:
        super().__init__()
        if not features:
            raise FeatureError("a tower needs at least one feature")
        names = [feature.spec.name for feature in features]
        if len(set(names)) != len(names):
            raise FeatureError(f"a tower's features need distinct names, got {names}")
        self.features = list(features)
        self.embedding_dim, self.layer_sizes, self.normalize = (
            int(embedding_dim),
            [int(s) for s in layer_sizes],
            normalize,
        )
        self.shapes: list[InputShape] = [shape for feature in features for shape in feature.inputs()]
        self.tables = nn.ModuleDict()
        width = 0
        for feature in features:
            dim = feature.spec.width(self.embedding_dim)
            for shape in feature.inputs():
                key = _key(shape.name)
                if shape.kind == "rows":
                    self.tables[key] = nn.Embedding(shape.rows, dim)
                    width += dim
                elif shape.kind == "bag":
                    # Row 0 is padding: left out of the mean (Keras's mask_zero=True and GlobalAveragePooling1D).
                    self.tables[key] = nn.EmbeddingBag(shape.rows, dim, mode=feature.spec.pooling, padding_idx=0)
                    width += dim
                elif shape.kind == "value":
                    width += 1
                else:
                    width += shape.width
        self.input_width = width
        layers: list[nn.Module] = []
        previous = width
        for position, size in enumerate(self.layer_sizes):
            if not 1 <= size <= _MAX_WIDTH:
                raise FeatureError(f"layer_sizes must hold ints in [1, {_MAX_WIDTH}], got {self.layer_sizes}")
            layers.append(nn.Linear(previous, size))
            if position < len(self.layer_sizes) - 1:
                layers.append(nn.ReLU())
            previous = size
        self.dense = nn.Sequential(*layers)
        self.output_dim = previous
        if init_scale > 0 and not _on_meta(self):
            self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float = 0.05) -> None:
        """Keras's initialisers: embeddings uniform(±init_scale), dense kernels Glorot uniform, zero biases."""
        with torch.no_grad():
            for table in self.tables.values():
                assert isinstance(table, (nn.Embedding, nn.EmbeddingBag))
                nn.init.uniform_(table.weight, -init_scale, init_scale)
                if isinstance(table, nn.EmbeddingBag):
                    table.weight[0].zero_()  # the padding row adds nothing (and gets no gradient)
            for layer in self.dense:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for shape in self.shapes:
            value = inputs.get(shape.name)
            if value is None:
                raise KeyError(f"the tower's input {shape.name!r} is missing; it takes {[s.name for s in self.shapes]}")
            if shape.kind == "rows" or shape.kind == "bag":
                parts.append(self.tables[_key(shape.name)](value))
            elif shape.kind == "value":
                parts.append(value.to(torch.float32)[:, None])
            else:
                parts.append(value.to(torch.float32))
        output = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        output = self.dense(output)
        if self.normalize:
            output = nn.functional.normalize(output, dim=1)
        return output

    def describe(self) -> dict[str, Any]:
        """The tower as JSON: its features (fitted state included), widths and layers."""
        return {
            "features": [feature.to_json() for feature in self.features],
            "embedding_dim": self.embedding_dim,
            "layer_sizes": self.layer_sizes,
            "normalize": self.normalize,
        }


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not hold dots


def _on_meta(module: nn.Module) -> bool:
    return any(parameter.is_meta for parameter in module.parameters())


def build_feature_tower(description: Any, tensors: Mapping[str, torch.Tensor]) -> FeatureTower:
    """The tower :meth:`FeatureTower.describe` described, with ``tensors`` (its ``state_dict``) loaded.

    Every field is checked and every tensor must be present with the shape and dtype the description implies.

    Raises:
        FeatureError: with what is wrong.
    """
    if not isinstance(description, dict) or set(description) != {
        "features",
        "embedding_dim",
        "layer_sizes",
        "normalize",
    }:
        raise FeatureError("a feature tower description has exactly: features, embedding_dim, layer_sizes, normalize")
    features = description["features"]
    if not isinstance(features, list) or not 1 <= len(features) <= 64:
        raise FeatureError("a feature tower description lists 1 to 64 features")
    dim, sizes, normalize = description["embedding_dim"], description["layer_sizes"], description["normalize"]
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_WIDTH:
        raise FeatureError(f"embedding_dim must be an int in [1, {_MAX_WIDTH}], got {dim!r}")
    if (
        not isinstance(sizes, list)
        or len(sizes) > _MAX_LAYERS
        or not all(isinstance(size, int) and not isinstance(size, bool) for size in sizes)
    ):
        raise FeatureError(f"layer_sizes must be a list of at most {_MAX_LAYERS} ints, got {sizes!r}")
    if not isinstance(normalize, bool):
        raise FeatureError(f"normalize must be true or false, got {normalize!r}")
    fitted = [feature_from_json(feature) for feature in features]
    with torch.device("meta"):  # no memory until the shapes are known to be sane; the weights come from the file
        tower = FeatureTower(fitted, dim, sizes, normalize, init_scale=0.0)
    load_checked_weights(tower, tensors, FeatureError)
    return tower.eval()
