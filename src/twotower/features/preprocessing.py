"""Feature preprocessing as data: each feature type is fitted on training values, saved as JSON, and applied
identically in training, evaluation and serving.

Keras puts ``StringLookup``, ``Hashing``, ``Discretization``, ``Normalization`` and ``TextVectorization`` inside the
model, so that a saved model takes raw features. Here the fitted state of each (a vocabulary, a mean and
variance, bucket boundaries) is a small JSON document (:meth:`FittedFeature.to_json`) and applying it is plain
numpy and Arrow, so a run or a bundle holds no code. The types (:data:`FEATURE_TYPES`):

- ``id``: a categorical value (string or integer) through a vocabulary with OOV rows (``StringLookup``), or
  hashed into ``hash_buckets`` rows (``Hashing``). One embedding row per value.
- ``multi``: several categorical values per row (genres, tags): an Arrow list column or a string split on
  ``separator``; the values' embeddings are pooled (``pooling``: mean or sum) by an ``EmbeddingBag``.
- ``numeric``: a number standardised by the training mean and variance (``Normalization``), one column wide,
  and optionally ``buckets`` quantile (or uniform) buckets with an embedding (``Discretization``).
- ``timestamp``: seconds since the epoch (or an Arrow timestamp), standardised and cut into ``buckets`` buckets
  (at training quantiles, or equal ones between the training minimum and maximum, ``linspace(min, max,
  buckets)``, as the TFRS tutorials do), both used.
- ``text``: lower-cased, punctuation stripped, split on whitespace (``TextVectorization``'s default), optionally
  with bigrams; tokens through a vocabulary of the ``max_tokens`` most frequent (or hashed), embeddings averaged
  over the tokens (``mask_zero=True`` then ``GlobalAveragePooling1D``). No tokenizer is downloaded.
- ``vector``: a precomputed vector per row (a column of float lists), used as it is.

Every transform returns ``{input name: tensor}`` (:meth:`FittedFeature.transform`): ``int64 [n]`` rows for an
embedding, ``int64 [n, L]`` rows padded with 0 for a pooled bag, ``float32 [n]`` or ``[n, d]`` values.
Missing values (nulls) take the OOV row (categorical), no token (multi, text) or the training median (numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.vocabulary import Vocabulary

#: The feature types a config may name.
FEATURE_TYPES = ("id", "multi", "numeric", "timestamp", "text", "vector")
#: Keras's ``TextVectorization`` default standardisation strips these characters (``string.punctuation``).
PUNCTUATION = r"""[!"#$%&()\*\+,\-\./:;<=>?@\[\\\]^_`{|}~']"""
#: Keras's ``Normalization`` divides by ``max(sqrt(variance), EPSILON)``.
EPSILON = 1e-7
_MAX_LENGTH = 256
_MAX_ROWS = 1 << 31


class FeatureError(ValueError):
    """A feature's settings or values are not what its type needs."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature as a config names it (``[query.features]`` / ``[candidate.features]``).

    Args:
        name: the feature's name (the config key); also its column unless ``column`` is given.
        type: one of :data:`FEATURE_TYPES`.
        column: the column it is read from (default: ``name``); two features may read one column (a title as an
            id and as text).
        dim: embedding width (0: the model's ``embedding_dim``).
        hash_buckets: ``id``, ``multi``, ``text``: hash values into this many rows instead of a vocabulary (0:
            a vocabulary of the training values).
        oov_buckets: rows shared by values outside the vocabulary.
        max_tokens: ``text`` and ``multi``: keep the most frequent values only; as Keras counts it, the padding
            and OOV rows included (0: every value seen in training).
        min_count: ``id``, ``multi``, ``text``: a value enters the vocabulary from this many training rows on.
        bigrams: ``text``: add each pair of adjacent tokens as a token.
        separator: ``multi`` on a string column: what separates the values.
        pooling: ``multi``, ``text``: ``"mean"`` or ``"sum"`` of the values' embeddings.
        buckets: ``numeric`` (default 0: none), ``timestamp`` (default 1000): bucket boundaries, each bucket an
            embedding row (``buckets + 1`` rows).
        bucketing: ``"quantile"`` (the default: boundaries at training quantiles, so every bucket holds as many
            training rows, and a time past the training period falls in the bucket of the latest training rows) or
            ``"uniform"`` (``linspace(min, max, buckets)``, as the TFRS tutorials cut timestamps; a later time then
            falls in a bucket only the training maximum trained).
        normalize: ``numeric``, ``timestamp``: also feed the standardised value as one column.
        max_length: ``multi``, ``text``: values kept per row (0: the longest training row's, at most 256).
        default: for a query feature missing from a serving request: ``"median"`` (numbers: the training median),
            ``"now"`` (timestamps: the time of the request), or a number; categorical features take the OOV row.
    """

    name: str
    type: str
    column: str = ""
    dim: int = 0
    hash_buckets: int = 0
    oov_buckets: int = 1
    max_tokens: int = 0
    min_count: int = 1
    bigrams: bool = False
    separator: str = "|"
    pooling: str = "mean"
    buckets: int = -1
    bucketing: str = ""
    normalize: bool = True
    max_length: int = 0
    default: str | float = "median"

    #: The settings each type takes (beyond name, type, column, dim).
    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "id": ("hash_buckets", "oov_buckets", "min_count"),
        "multi": ("hash_buckets", "oov_buckets", "max_tokens", "min_count", "separator", "pooling", "max_length"),
        "numeric": ("buckets", "bucketing", "normalize", "default"),
        "timestamp": ("buckets", "bucketing", "normalize", "default"),
        "text": ("hash_buckets", "oov_buckets", "max_tokens", "min_count", "bigrams", "pooling", "max_length"),
        "vector": ("default",),
    }

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise FeatureError(f"a feature's name must be a non-empty string, got {self.name!r}")
        if self.type not in FEATURE_TYPES:
            raise FeatureError(f"{where}: unknown feature type {self.type!r}; the types are {list(FEATURE_TYPES)}")
        if not isinstance(self.column, str):
            raise FeatureError(f"{where}: column must be a string, got {self.column!r}")
        if not self.column:
            object.__setattr__(self, "column", self.name)
        for name in ("dim", "hash_buckets", "max_tokens", "max_length"):
            _require_int(getattr(self, name), f"{where}: {name}", 0, _MAX_ROWS)
        _require_int(self.oov_buckets, f"{where}: oov_buckets", 1, _MAX_ROWS)
        _require_int(self.min_count, f"{where}: min_count", 1, _MAX_ROWS)
        if self.buckets == -1:
            object.__setattr__(self, "buckets", 1000 if self.type == "timestamp" else 0)
        _require_int(self.buckets, f"{where}: buckets", 0, 1 << 20)
        if not self.bucketing:
            object.__setattr__(self, "bucketing", "quantile")
        if self.bucketing not in ("uniform", "quantile"):
            raise FeatureError(f"{where}: bucketing must be 'uniform' or 'quantile', got {self.bucketing!r}")
        if self.pooling not in ("mean", "sum"):
            raise FeatureError(f"{where}: pooling must be 'mean' or 'sum', got {self.pooling!r}")
        if not isinstance(self.separator, str) or not self.separator:
            raise FeatureError(f"{where}: separator must be a non-empty string, got {self.separator!r}")
        for name in ("bigrams", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise FeatureError(f"{where}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.hash_buckets == 1:
            raise FeatureError(f"{where}: hash_buckets must be 0 (a vocabulary) or >= 2, got 1")
        if self.max_tokens and self.max_tokens < 3 and self.type in ("multi", "text"):
            raise FeatureError(f"{where}: max_tokens counts the padding and OOV rows: give at least 3 (or 0: all)")
        default = self.default
        if isinstance(default, bool) or not (
            default in ("median", "now") or (isinstance(default, (int, float)) and math.isfinite(default))
        ):
            raise FeatureError(f"{where}: default must be 'median', 'now' or a finite number, got {default!r}")
        if default == "now" and self.type != "timestamp":
            raise FeatureError(f"{where}: default 'now' is for timestamp features only")
        if self.type in ("numeric", "timestamp") and not self.normalize and not self.buckets:
            raise FeatureError(f"{where}: with normalize = false a {self.type} feature needs buckets > 0")

    @classmethod
    def from_config(cls, name: str, value: Any, where: str) -> FeatureSpec:
        """A spec from a config entry: ``"type"`` or a table ``{type = "...", option = ...}``.

        Raises:
            FeatureError: an unknown type or option, or a bad value, naming ``where`` and the feature.
        """
        try:
            return cls._from_config(name, value, where)
        except FeatureError as error:
            message = str(error)
            raise FeatureError(message if message.startswith(where) else f"{where}: {message}") from None

    @classmethod
    def _from_config(cls, name: str, value: Any, where: str) -> FeatureSpec:
        if isinstance(value, str):
            return cls(name=name, type=value)
        if not isinstance(value, Mapping) or "type" not in value:
            raise FeatureError(f"{where}: feature {name!r} must be a type name or a table with a type, got {value!r}")
        kind = value["type"]
        if kind not in FEATURE_TYPES:
            raise FeatureError(
                f"{where}: feature {name!r} has unknown type {kind!r}; the types are {list(FEATURE_TYPES)}"
            )
        allowed = {"type", "column", "dim", *cls.OPTIONS[kind]}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise FeatureError(f"{where}: feature {name!r} ({kind}) takes no {unknown}; it takes {sorted(allowed)}")
        try:
            return cls(name=name, **dict(value))
        except TypeError as error:
            raise FeatureError(f"{where}: feature {name!r}: {error}") from None

    def to_config(self) -> dict[str, Any]:
        """The settings that differ from the type's defaults, as a config table (:meth:`from_config` reads it)."""
        default = FeatureSpec(name=self.name, type=self.type)
        table: dict[str, Any] = {"type": self.type}
        for item in fields(self):
            if item.name in ("name", "type"):
                continue
            value = getattr(self, item.name)
            if value != getattr(default, item.name):
                table[item.name] = value
        return table

    def width(self, default_dim: int) -> int:
        """Embedding width of this feature's tables."""
        return self.dim or default_dim


def _require_int(value: Any, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FeatureError(f"{name} must be an int in [{low}, {high}], got {value!r}")


# --- fitted features ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputShape:
    """One tensor a fitted feature produces: ``kind`` is ``"rows"`` (int64 ``[n]`` embedding rows), ``"bag"``
    (int64 ``[n, length]`` rows, 0 = padding), ``"value"`` (float32 ``[n]``) or ``"vector"`` (float32 ``[n, width]``);
    ``rows`` is the embedding table's size for rows and bags."""

    name: str
    kind: str
    rows: int = 0
    length: int = 0
    width: int = 0


class FittedFeature:
    """A feature fitted on training values: transforms raw values to model inputs; saved and loaded as JSON."""

    spec: FeatureSpec

    def inputs(self) -> list[InputShape]:
        """The tensors :meth:`transform` returns, by name."""
        raise NotImplementedError

    def transform(self, values: Any) -> dict[str, torch.Tensor]:
        """Model inputs for raw ``values`` (an Arrow array, a list, or a numpy array)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self) -> str:
        """One line: the feature, its type, source column and fitted sizes, e.g. ``title_text (text from
        movie_title: 2,468 rows)``."""
        source = "" if self.spec.column == self.spec.name else f" from {self.spec.column}"
        sizes = []
        for shape in self.inputs():
            if shape.kind in ("rows", "bag"):
                sizes.append(f"{shape.rows:,} rows")
            elif shape.kind == "vector":
                sizes.append(f"{shape.width} wide")
            else:
                sizes.append("standardised")
        return f"{self.spec.name} ({self.spec.type}{source}: {', '.join(sizes)})"

    def to_json(self) -> dict[str, Any]:
        """``{"spec": ..., "state": ...}``, which :func:`feature_from_json` turns back into an equal feature."""
        return {"spec": asdict(self.spec), "state": self.state()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FittedFeature) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


def _as_array(values: Any, spec: FeatureSpec) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    try:
        return pa.array(values.tolist() if isinstance(values, np.ndarray) else list(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as error:
        raise FeatureError(f"feature {spec.name!r} (column {spec.column!r}): values of mixed types: {error}") from None


def _categorical(values: Any, spec: FeatureSpec) -> pa.Array:
    """Categorical values (an Arrow array, or a list of strings, integers and ``None``) as text."""
    if isinstance(values, (list, tuple)):
        texts: list[str | None] = []
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, np.integer))):
                raise FeatureError(
                    f"feature {spec.name!r} ({spec.type}): values must be strings or integers, got {value!r}"
                )
            texts.append(None if value is None else str(value))
        return pa.array(texts, type=pa.large_string())
    return _strings(_as_array(values, spec), spec)


def _strings(values: pa.Array, spec: FeatureSpec) -> pa.Array:
    """Categorical values as text (integers as their decimal text, so 42 and "42" are one value)."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return _strings(values.dictionary_decode(), spec)
    if (
        pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_null(kind)
    ):
        return pc.cast(values, pa.large_string())
    if pa.types.is_boolean(kind):
        return pc.cast(pc.cast(values, pa.int8()), pa.large_string())
    raise FeatureError(
        f"feature {spec.name!r} ({spec.type}): column {spec.column!r} must hold strings or integers, got {kind}"
    )


def _is_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def seconds_since_epoch(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """An Arrow timestamp or date column as float seconds since the epoch; any other column as it is."""
    if pa.types.is_timestamp(values.type):
        return pc.divide(pc.cast(pc.cast(values, pa.timestamp("us")), pa.int64()), 1_000_000.0)
    if pa.types.is_date(values.type):
        return pc.multiply(pc.cast(pc.cast(values, pa.date32()), pa.int32()), 86_400.0)
    return values


def _lookup(vocabulary: Vocabulary, strings: pa.Array, offset: int) -> np.ndarray:
    """``int64`` rows of ``strings`` shifted by ``offset``; a null takes OOV row 0 (shifted)."""
    rows = np.zeros(len(strings), dtype=np.int64)
    valid = pc.is_valid(strings).to_numpy(zero_copy_only=False)
    if valid.any():
        present = strings if valid.all() else strings.filter(pa.array(valid))
        rows[valid] = vocabulary.lookup(present)
    return rows + offset


def _fit_vocabulary(strings: pa.Array, spec: FeatureSpec, reserved: int) -> Vocabulary:
    """The ``max_tokens - reserved`` most frequent values seen at least ``min_count`` times, or hashing."""
    if spec.hash_buckets:
        return Vocabulary.hashing(spec.hash_buckets)
    present = strings.drop_null()
    if len(present) == 0:
        raise FeatureError(f"feature {spec.name!r}: column {spec.column!r} holds no value in the data it is fitted on")
    counts = pc.value_counts(present)
    values, frequency = counts.field("values"), counts.field("counts").to_numpy()
    keep = np.flatnonzero(frequency >= spec.min_count)
    if spec.max_tokens:
        limit = max(spec.max_tokens - reserved - spec.oov_buckets, 1)
        # Most frequent first; ties by value, so that the cut does not depend on the data's order.
        order = np.lexsort((pc.rank(values, sort_keys="ascending").to_numpy()[keep], -frequency[keep]))
        keep = keep[order[:limit]]
    if keep.size == 0:
        raise FeatureError(f"feature {spec.name!r}: no value of column {spec.column!r} occurs min_count times")
    return Vocabulary(values.take(pa.array(keep)), num_oov_buckets=spec.oov_buckets)


class IdFeature(FittedFeature):
    """A categorical value: row ``vocabulary.lookup(value)`` of a ``len(vocabulary)``-row table."""

    def __init__(self, spec: FeatureSpec, vocabulary: Vocabulary) -> None:
        self.spec, self.vocabulary = spec, vocabulary

    @classmethod
    def fit(cls, spec: FeatureSpec, values: Any) -> IdFeature:
        return cls(spec, _fit_vocabulary(_categorical(values, spec), spec, reserved=0))

    def inputs(self) -> list[InputShape]:
        return [InputShape(self.spec.name, "rows", rows=len(self.vocabulary))]

    def transform(self, values: Any) -> dict[str, torch.Tensor]:
        rows = _lookup(self.vocabulary, _categorical(values, self.spec), 0)
        return {self.spec.name: torch.from_numpy(rows)}

    def state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary.to_json()}

    @classmethod
    def from_state(cls, spec: FeatureSpec, state: dict[str, Any]) -> IdFeature:
        return cls(spec, Vocabulary.from_json(state["vocabulary"], f"feature {spec.name!r}'s vocabulary"))


def tokenize(values: Any, bigrams: bool = False) -> pa.Array:
    """Keras ``TextVectorization``'s default: lower-case, strip :data:`PUNCTUATION`, split on whitespace;
    with ``bigrams`` each adjacent pair ``"a b"`` follows the unigrams (its ``ngrams=2``). Returns a list array
    (a null text has no tokens)."""
    text = pc.cast(values, pa.large_string())
    cleaned = pc.replace_substring_regex(pc.utf8_lower(text), pattern=PUNCTUATION, replacement="")
    tokens = pc.utf8_split_whitespace(pc.fill_null(cleaned, ""))
    # "" splits into [""]: drop empty tokens (a title of punctuation only has none).
    flat = pc.list_flatten(tokens)
    parents = pc.list_parent_indices(tokens).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat, parents = flat.filter(pa.array(keep)), parents[keep]
    if bigrams and len(flat) > 1:
        same = parents[1:] == parents[:-1]
        pairs = pc.binary_join_element_wise(
            flat.slice(0, len(flat) - 1), flat.slice(1), pa.scalar(" ", pa.large_string())
        ).filter(pa.array(same))
        flat = pa.concat_arrays([flat, pairs])
        parents = np.concatenate([parents, parents[:-1][same]])
        order = np.argsort(parents, kind="stable")  # each row's unigrams, then its bigrams
        flat, parents = flat.take(pa.array(order)), parents[order]
    offsets = np.zeros(len(text) + 1, dtype=np.int64)
    np.add.at(offsets, parents + 1, 1)
    return pa.LargeListArray.from_arrays(pa.array(np.cumsum(offsets)), flat)


class BagFeature(FittedFeature):
    """Several categorical values per row (``multi``) or the tokens of a text (``text``), as padded rows of a
    ``1 + len(vocabulary)``-row table: row 0 is padding (left out of the pooling), rows ``1..`` the vocabulary's
    (its OOV rows first), as Keras's ``TextVectorization`` lays out its output."""

    def __init__(self, spec: FeatureSpec, vocabulary: Vocabulary, length: int) -> None:
        self.spec, self.vocabulary, self.length = spec, vocabulary, length

    @staticmethod
    def _lists(spec: FeatureSpec, values: Any) -> pa.Array:
        """Each row's values (``multi``) or tokens (``text``) as an Arrow list array."""
        array = _as_array(values, spec)
        if spec.type == "text":
            if not (_is_text(array.type) or pa.types.is_null(array.type)):
                raise FeatureError(
                    f"feature {spec.name!r} (text): column {spec.column!r} must hold strings, got {array.type}"
                )
            return tokenize(array, spec.bigrams)
        if _is_text(array.type):
            return pc.split_pattern(pc.cast(array, pa.large_string()), pattern=spec.separator)
        if _is_list(array.type):
            return array
        raise FeatureError(
            f"feature {spec.name!r} (multi): column {spec.column!r} must hold lists or {spec.separator!r}-separated "
            f"strings, got {array.type}"
        )

    @classmethod
    def fit(cls, spec: FeatureSpec, values: Any) -> BagFeature:
        lists = cls._lists(spec, values)
        flat = _strings(pc.list_flatten(lists), spec)
        flat = flat.filter(pc.not_equal(flat, "")) if len(flat) else flat
        vocabulary = _fit_vocabulary(flat, spec, reserved=1)
        longest = int(pc.max(pc.list_value_length(lists)).as_py() or 1) if len(lists) else 1
        return cls(spec, vocabulary, spec.max_length or min(max(longest, 1), _MAX_LENGTH))

    def inputs(self) -> list[InputShape]:
        return [InputShape(self.spec.name, "bag", rows=1 + len(self.vocabulary), length=self.length)]

    def transform(self, values: Any) -> dict[str, torch.Tensor]:
        lists = self._lists(self.spec, values)
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = _strings(pc.list_flatten(lists), self.spec)
        parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = _lookup(self.vocabulary, flat, 1)
        if self.spec.type == "multi" and len(flat):  # an empty piece ("a||b") is no value
            rows[pc.equal(flat, "").to_numpy(zero_copy_only=False)] = 0
        starts = np.zeros(lengths.shape[0], dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        position = np.arange(parents.shape[0], dtype=np.int64) - starts[parents] if parents.size else parents
        kept = position < self.length  # values past max_length are dropped, as Keras's output_sequence_length
        out = np.zeros((lengths.shape[0], self.length), dtype=np.int64)
        out[parents[kept], position[kept]] = rows[kept]
        return {self.spec.name: torch.from_numpy(out)}

    def state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary.to_json(), "length": self.length}

    @classmethod
    def from_state(cls, spec: FeatureSpec, state: dict[str, Any]) -> BagFeature:
        length = state["length"]
        _require_int(length, f"feature {spec.name!r}'s length", 1, _MAX_LENGTH)
        return cls(spec, Vocabulary.from_json(state["vocabulary"], f"feature {spec.name!r}'s vocabulary"), length)


def _numbers(values: Any, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 values, valid mask)``: timestamps as seconds since the epoch; non-finite values refused."""
    array = _as_array(values, spec)
    kind = array.type
    readable = (pa.types.is_integer, pa.types.is_floating, pa.types.is_null, pa.types.is_boolean,
                pa.types.is_timestamp, pa.types.is_date)  # fmt: skip
    if not any(test(kind) for test in readable):
        raise FeatureError(f"feature {spec.name!r} ({spec.type}): column {spec.column!r} must hold numbers, got {kind}")
    array = seconds_since_epoch(array)
    valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
    numbers = pc.fill_null(pc.cast(array, pa.float64()), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = valid & ~np.isfinite(numbers)
    if bad.any():
        raise FeatureError(
            f"feature {spec.name!r}: column {spec.column!r} holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
            f"the first at row {int(np.flatnonzero(bad)[0])}"
        )
    return numbers, valid


class NumericFeature(FittedFeature):
    """A number (``numeric``) or a time (``timestamp``): the standardised value ``(x - mean) / max(std, 1e-7)``
    (``Normalization``) and/or the row of its bucket, ``searchsorted(boundaries, x, "right")`` of
    ``len(boundaries) + 1`` rows (``Discretization``: bucket ``i`` holds ``boundaries[i-1] <= x < boundaries[i]``).
    A missing value is the training median. The standardised value is clipped to the training range: after a time
    split every test time lies past the last training time, and an unclipped value (several standard deviations
    out) through a dense layer moves every test query far from where training left it. (Keras does not clip; with
    the statistics adapted on every row, as the TFRS tutorials do, nothing lies outside.)"""

    def __init__(
        self,
        spec: FeatureSpec,
        mean: float,
        variance: float,
        median: float,
        boundaries: list[float],
        minimum: float,
        maximum: float,
    ) -> None:
        self.spec, self.mean, self.variance, self.median, self.boundaries = spec, mean, variance, median, boundaries
        self.minimum, self.maximum = minimum, maximum

    @classmethod
    def fit(cls, spec: FeatureSpec, values: Any) -> NumericFeature:
        numbers, valid = _numbers(values, spec)
        present = numbers[valid]
        if present.size == 0:
            raise FeatureError(
                f"feature {spec.name!r}: column {spec.column!r} holds no value in the data it is fitted on"
            )
        boundaries: list[float] = []
        if spec.buckets:
            if spec.bucketing == "uniform":
                boundaries = np.linspace(present.min(), present.max(), spec.buckets).tolist()
            else:
                cuts = np.quantile(present, np.arange(1, spec.buckets + 1) / (spec.buckets + 1))
                boundaries = np.unique(cuts).tolist()
        return cls(spec, float(present.mean()), float(present.var()), float(np.median(present)), boundaries,
                   float(present.min()), float(present.max()))  # fmt: skip

    def inputs(self) -> list[InputShape]:
        shapes = [InputShape(f"{self.spec.name}.value", "value")] if self.spec.normalize else []
        if self.boundaries:
            shapes.append(InputShape(f"{self.spec.name}.bucket", "rows", rows=len(self.boundaries) + 1))
        return shapes

    def transform(self, values: Any) -> dict[str, torch.Tensor]:
        numbers, valid = _numbers(values, self.spec)
        numbers = np.where(valid, numbers, self.median)
        out: dict[str, torch.Tensor] = {}
        if self.spec.normalize:
            scale = max(math.sqrt(self.variance), EPSILON)
            clipped = np.clip(numbers, self.minimum, self.maximum)
            out[f"{self.spec.name}.value"] = torch.from_numpy(((clipped - self.mean) / scale).astype(np.float32))
        if self.boundaries:
            rows = np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), numbers, side="right")
            out[f"{self.spec.name}.bucket"] = torch.from_numpy(rows.astype(np.int64))
        return out

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "variance": self.variance, "median": self.median, "boundaries": self.boundaries,
                "minimum": self.minimum, "maximum": self.maximum}  # fmt: skip

    @classmethod
    def from_state(cls, spec: FeatureSpec, state: dict[str, Any]) -> NumericFeature:
        numbers = [state["mean"], state["variance"], state["median"], state["minimum"], state["maximum"],
                   *state["boundaries"]]  # fmt: skip
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
            raise FeatureError(f"feature {spec.name!r}: the saved statistics must be finite numbers")
        if (
            state["variance"] < 0
            or list(state["boundaries"]) != sorted(state["boundaries"])
            or state["minimum"] > state["maximum"]
        ):
            raise FeatureError(f"feature {spec.name!r}: a negative variance, unsorted bucket boundaries or range")
        mean, variance, median = (float(state[name]) for name in ("mean", "variance", "median"))
        boundaries = [float(x) for x in state["boundaries"]]
        return cls(spec, mean, variance, median, boundaries, float(state["minimum"]), float(state["maximum"]))


class VectorFeature(FittedFeature):
    """A precomputed vector per row (a list column of ``width`` numbers), used as it is; a missing one is zeros
    (or ``default`` in every component)."""

    def __init__(self, spec: FeatureSpec, width: int) -> None:
        self.spec, self.width = spec, width

    @classmethod
    def fit(cls, spec: FeatureSpec, values: Any) -> VectorFeature:
        lists = cls._lists(spec, values)
        lengths = pc.drop_null(pc.list_value_length(lists)).to_numpy(zero_copy_only=False)
        if lengths.size == 0 or lengths.min() != lengths.max() or lengths[0] < 1:
            raise FeatureError(
                f"feature {spec.name!r} (vector): column {spec.column!r} must hold lists of one length >= 1, "
                f"got lengths {sorted(set(lengths.tolist()))[:5]}"
            )
        return cls(spec, int(lengths[0]))

    @staticmethod
    def _lists(spec: FeatureSpec, values: Any) -> pa.Array:
        array = _as_array(values, spec)
        if not _is_list(array.type):
            raise FeatureError(
                f"feature {spec.name!r} (vector): column {spec.column!r} must hold lists of numbers, got {array.type}"
            )
        return array

    def inputs(self) -> list[InputShape]:
        return [InputShape(self.spec.name, "vector", width=self.width)]

    def transform(self, values: Any) -> dict[str, torch.Tensor]:
        lists = self._lists(self.spec, values)
        valid = pc.is_valid(lists).to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(lists), self.width).to_numpy(zero_copy_only=False)
        if (lengths != self.width).any():
            row = int(np.flatnonzero(lengths != self.width)[0])
            raise FeatureError(
                f"feature {self.spec.name!r}: row {row} of column {self.spec.column!r} holds {int(lengths[row])} "
                f"numbers, expected {self.width}"
            )
        fill = 0.0 if isinstance(self.spec.default, str) else float(self.spec.default)
        out = np.full((len(lists), self.width), fill, dtype=np.float64)
        present = lists.filter(pa.array(valid)) if not valid.all() else lists
        flat = _numbers(pc.list_flatten(present), self.spec)[0]
        out[valid] = flat.reshape(-1, self.width)
        return {self.spec.name: torch.from_numpy(out.astype(np.float32))}

    def state(self) -> dict[str, Any]:
        return {"width": self.width}

    @classmethod
    def from_state(cls, spec: FeatureSpec, state: dict[str, Any]) -> VectorFeature:
        _require_int(state["width"], f"feature {spec.name!r}'s width", 1, 1 << 16)
        return cls(spec, state["width"])


_CLASSES: dict[str, Any] = {
    "id": IdFeature,
    "multi": BagFeature,
    "text": BagFeature,
    "numeric": NumericFeature,
    "timestamp": NumericFeature,
    "vector": VectorFeature,
}


def fit_feature(spec: FeatureSpec, values: Any) -> FittedFeature:
    """Fit ``spec`` on ``values`` (the training split's column, or, to match the TFRS tutorials, all of it).

    Raises:
        FeatureError: the values do not suit the type (a text column of numbers, non-finite numbers, ragged
            vectors), naming the feature and its column.
    """
    fitted: FittedFeature = _CLASSES[spec.type].fit(spec, values)
    return fitted


def feature_from_json(document: Any) -> FittedFeature:
    """The feature :meth:`FittedFeature.to_json` described; every field is checked.

    Raises:
        FeatureError: the document does not describe a fitted feature.
    """
    if not isinstance(document, dict) or set(document) != {"spec", "state"} or not isinstance(document["spec"], dict):
        raise FeatureError("a saved feature is {'spec': {...}, 'state': {...}}")
    known = {item.name for item in fields(FeatureSpec)}
    if not set(document["spec"]) <= known or not isinstance(document["state"], dict):
        raise FeatureError(f"a saved feature's spec holds unknown fields {sorted(set(document['spec']) - known)}")
    spec = FeatureSpec(**document["spec"])
    try:
        fitted: FittedFeature = _CLASSES[spec.type].from_state(spec, document["state"])
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, FeatureError):
            raise
        raise FeatureError(f"feature {spec.name!r}: its saved state is malformed ({error})") from None
    return fitted


def transform_all(features: Sequence[FittedFeature], columns: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every feature's inputs from ``columns`` (``{column name: values}``), merged into one dict."""
    out: dict[str, torch.Tensor] = {}
    for feature in features:
        out.update(feature.transform(columns[feature.spec.column]))
    return out
