"""Towers as data: a JSON description of the layers and their weights in safetensors, rebuilt without code.

A saved model must never be able to run code when it is loaded. ``torch.export`` archives and TorchScript files
can carry pickled objects, and a checksum does not stop whoever writes the file from writing code into it. A
tower saved here is therefore only a list of layers from a fixed vocabulary (:data:`LAYER_TYPES`) and one
safetensors file of tensors, and loading it builds those layers with torch's own constructors, then copies the
tensors in by name, each shape checked.

Supported: ``nn.Embedding``, ``nn.Linear``, ``nn.ReLU``, and ``nn.Sequential`` chains of them (nested chains are
flattened), which covers id towers and the MLP towers of TFRS's tutorials.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: The layer types a description may name.
LAYER_TYPES = ("embedding", "linear", "relu")
_MAX_LAYERS = 64
_MAX_ROWS = 1 << 32
_MAX_WIDTH = 1 << 16


class TowerFormatError(ValueError):
    """A tower description or its weights do not describe a tower this module can build."""


def describe_tower(tower: nn.Module) -> list[dict[str, Any]]:
    """The layer list of ``tower``: JSON-serialisable, one dict per layer.

    Raises:
        TypeError: ``tower`` holds a module outside :data:`LAYER_TYPES` (a bundle holds no code, so arbitrary
            modules cannot be saved in one).
    """
    layers: list[dict[str, Any]] = []
    for module in _flatten(tower):
        if isinstance(module, nn.Embedding):
            if module.padding_idx is not None or module.max_norm is not None:
                raise TypeError("query_tower: nn.Embedding with padding_idx or max_norm cannot be saved as data")
            layers.append({"type": "embedding", "rows": module.num_embeddings, "dim": module.embedding_dim})
        elif isinstance(module, nn.Linear):
            layers.append(
                {
                    "type": "linear",
                    "in": module.in_features,
                    "out": module.out_features,
                    "bias": module.bias is not None,
                }
            )
        elif isinstance(module, nn.ReLU):
            layers.append({"type": "relu"})
        else:
            raise TypeError(
                f"query_tower holds a {type(module).__name__}: a saved tower is data, not code, and may only chain "
                f"nn.Embedding, nn.Linear and nn.ReLU (in an nn.Sequential)"
            )
    if not layers:
        raise TypeError("query_tower has no layers")
    return layers


def tower_tensors(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``tower``, keyed as the tower built by :func:`build_tower` from its description names them."""
    tensors: dict[str, torch.Tensor] = {}
    for position, module in enumerate(_flatten(tower)):
        for name, tensor in module.state_dict().items():
            tensors[f"{position}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors


def build_tower(description: Any, tensors: dict[str, torch.Tensor]) -> nn.Sequential:
    """Build the tower that ``description`` (from :func:`describe_tower`) names and load ``tensors`` into it.

    Every field is checked (type, range) and every tensor must be present with the shape and dtype its layer
    has; nothing else is accepted.

    Raises:
        TowerFormatError: with what is wrong.
    """
    if not isinstance(description, list) or not 1 <= len(description) <= _MAX_LAYERS:
        raise TowerFormatError(f"a tower description is a list of 1 to {_MAX_LAYERS} layers")
    layers: list[nn.Module] = []
    for position, layer in enumerate(description):
        if not isinstance(layer, dict) or layer.get("type") not in LAYER_TYPES:
            kind = layer.get("type") if isinstance(layer, dict) else layer
            raise TowerFormatError(f"layer {position}: unknown layer type {kind!r} (known: {', '.join(LAYER_TYPES)})")
        kind = layer["type"]
        expected = {"embedding": {"type", "rows", "dim"}, "linear": {"type", "in", "out", "bias"}, "relu": {"type"}}
        if set(layer) != expected[kind]:
            raise TowerFormatError(f"layer {position} ({kind}) must have exactly the fields {sorted(expected[kind])}")
        with torch.device("meta"):  # no memory until the shapes are known to be sane; weights come from the file
            if kind == "embedding":
                layers.append(nn.Embedding(_size(layer, "rows", position, _MAX_ROWS), _size(layer, "dim", position)))
            elif kind == "linear":
                if not isinstance(layer["bias"], bool):
                    raise TowerFormatError(f"layer {position}: bias must be true or false")
                in_features, out_features = _size(layer, "in", position), _size(layer, "out", position)
                layers.append(nn.Linear(in_features, out_features, bias=layer["bias"]))
            else:
                layers.append(nn.ReLU())
    tower = nn.Sequential(*layers)
    load_checked_weights(tower, tensors, TowerFormatError)
    return tower.eval()


def load_checked_weights(tower: nn.Module, tensors: Mapping[str, torch.Tensor], error: type[Exception]) -> None:
    """Load ``tensors`` into ``tower`` (built on the meta device) if they are exactly its weights: the same names,
    shapes and dtypes, nothing more.

    Raises:
        error: naming the missing, unexpected and misshapen tensors.
    """
    wanted = {name: (tuple(value.shape), value.dtype) for name, value in tower.state_dict().items()}
    found = {name: (tuple(value.shape), value.dtype) for name, value in tensors.items()}
    if wanted != found:
        missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
        wrong = sorted(name for name in set(wanted) & set(found) if wanted[name] != found[name])
        raise error(
            f"the tower's weights do not fit its description (missing {missing}, unexpected {extra}, "
            f"wrong shape or dtype {wrong})"
        )
    tower.load_state_dict(dict(tensors), strict=True, assign=True)


def _size(layer: dict[str, Any], field: str, position: int, limit: int = _MAX_WIDTH) -> int:
    value = layer[field]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise TowerFormatError(f"layer {position}: {field} must be an int in [1, {limit}], got {value!r}")
    return value


def _flatten(tower: nn.Module) -> list[nn.Module]:
    if isinstance(tower, nn.Sequential):
        return [leaf for module in tower for leaf in _flatten(module)]
    return [tower]
