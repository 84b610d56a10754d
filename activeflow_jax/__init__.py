"""activeflow-jax: LLM inference on JAX/XLA in less DRAM than the model needs (ActiveFlow).

Public API:
    af.fetch_default_model() -> store path       af.convert(gguf, store, dtype=...)
    af.verify_store(store) -> VerifyReport        every chunk's checksum and the manifest
    af.fetch_model("gemma3-270m") -> store path  other known models (fetch.MODELS)
    af.Engine.load(store)                         engine.generate / stream / logits / stats
    af.calibrate(store, levels=[0.5])             sparsity thresholds into the store
    af.Engine.load(store, sparsity=0.5)           contextual sparsity (TEAL thresholds, top-k kernels)
    af.evaluate_quality(engine, text, settings)   PPL / KL / top-1 agreement of sparse settings vs dense
    af.distill(store, out, af.DistillConfig(...)) sparsity-aware self-distillation into a new store
    af.evaluate_tasks(engine, "piqa,arc_easy")    task accuracy (lm-eval-harness conventions, offline)
"""

from activeflow_jax.config import ModelConfig, PredictionConfig, SparsityConfig
from activeflow_jax.distill import DistillConfig, DistillResult, distill
from activeflow_jax.engine import Engine, EngineStats
from activeflow_jax.errors import (
    ActiveFlowError,
    FetchError,
    GGUFError,
    InvalidArgumentError,
    MappingLimitError,
    PromptTooLongError,
    StoreCorruptError,
    StoreError,
    UnsupportedModelError,
)
from activeflow_jax.eval.perplexity import PerplexityResult, engine_perplexity
from activeflow_jax.eval.quality import QualityReport, QualitySetting, evaluate_quality
from activeflow_jax.eval.tasks import TaskReport, TaskResult, evaluate_tasks
from activeflow_jax.fetch import fetch_default_model, fetch_model
from activeflow_jax.sampling import SamplingParams
from activeflow_jax.sparse.calibrate import calibrate
from activeflow_jax.sparse.thresholds import Calibration
from activeflow_jax.store.verify import VerifyReport, verify_store
from activeflow_jax.store.writer import convert

__version__ = "0.1.0"

__all__ = [
    "Calibration", "DistillConfig", "DistillResult", "distill", "PredictionConfig", "QualityReport", "QualitySetting", "SparsityConfig", "calibrate",
    "evaluate_quality",
    "ActiveFlowError", "Engine", "EngineStats", "FetchError", "GGUFError", "InvalidArgumentError", "MappingLimitError", "ModelConfig",
    "PerplexityResult", "PromptTooLongError", "SamplingParams", "StoreCorruptError", "StoreError", "TaskReport",
    "TaskResult", "UnsupportedModelError", "convert", "engine_perplexity", "evaluate_tasks", "fetch_default_model",
    "VerifyReport", "verify_store", "fetch_model",
]
