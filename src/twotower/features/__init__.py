"""Feature towers: feature types fitted on training data and saved as data (:mod:`.preprocessing`), and the
tower that embeds, concatenates and passes them through dense layers (:mod:`.tower`)."""

from twotower.features.preprocessing import (
    FEATURE_TYPES,
    BagFeature,
    FeatureError,
    FeatureSpec,
    FittedFeature,
    IdFeature,
    InputShape,
    NumericFeature,
    VectorFeature,
    feature_from_json,
    fit_feature,
    tokenize,
    transform_all,
)
from twotower.features.tower import FeatureTower, build_feature_tower

__all__ = [
    "FEATURE_TYPES",
    "BagFeature",
    "FeatureError",
    "FeatureSpec",
    "FeatureTower",
    "FittedFeature",
    "IdFeature",
    "InputShape",
    "NumericFeature",
    "VectorFeature",
    "build_feature_tower",
    "feature_from_json",
    "fit_feature",
    "tokenize",
    "transform_all",
]
