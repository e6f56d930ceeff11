"""Your own interaction log to a trained, evaluated and served id-based two-tower model.

Each step is one module: :mod:`~twotower.pipeline.config` (settings from Python, TOML or flags),
:mod:`~twotower.data.interactions` (reading), :mod:`~twotower.data.splits`, :mod:`~twotower.pipeline.prepared`
(vocabularies and rows), :mod:`~twotower.pipeline.model`, :mod:`~twotower.pipeline.training`,
:mod:`~twotower.pipeline.evaluation` (the model beside the popularity baseline) and
:mod:`~twotower.pipeline.runs` (saving, loading and re-evaluating a run directory with its serving bundle).
"""

from twotower.pipeline.config import ConfigError, PipelineConfig, load_config, make_config
from twotower.pipeline.evaluation import evaluate_part
from twotower.pipeline.model import IdRetrievalModel
from twotower.pipeline.prepared import PreparedInteractions, prepare_interactions
from twotower.pipeline.runs import LoadedPipelineRun, RunDirectoryError, evaluate_run, load_pipeline_run, save_run
from twotower.pipeline.training import (
    TrainedModel,
    build_model,
    fit,
    load_interactions,
    movielens_interactions,
    prepare,
    train,
)

__all__ = [
    "ConfigError",
    "IdRetrievalModel",
    "LoadedPipelineRun",
    "PipelineConfig",
    "PreparedInteractions",
    "RunDirectoryError",
    "TrainedModel",
    "build_model",
    "evaluate_part",
    "evaluate_run",
    "fit",
    "load_config",
    "load_interactions",
    "load_pipeline_run",
    "make_config",
    "movielens_interactions",
    "prepare",
    "prepare_interactions",
    "save_run",
    "train",
]
