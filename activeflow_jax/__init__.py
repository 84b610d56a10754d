"""activeflow-jax: LLM inference on JAX/XLA in less DRAM than the model needs (ActiveFlow).

Public API:
    af.fetch_default_model() -> store path       af.convert(gguf, store, dtype=...)
    af.Engine.load(store)                         engine.generate / stream / logits / stats
"""

from activeflow_jax.config import ModelConfig
from activeflow_jax.engine import Engine, EngineStats
from activeflow_jax.errors import (
    ActiveFlowError,
    FetchError,
    GGUFError,
    InvalidArgumentError,
    PromptTooLongError,
    StoreCorruptError,
    StoreError,
    UnsupportedModelError,
)
from activeflow_jax.eval.perplexity import PerplexityResult, engine_perplexity
from activeflow_jax.fetch import fetch_default_model
from activeflow_jax.sampling import SamplingParams
from activeflow_jax.store.writer import convert

__version__ = "0.1.0"

__all__ = [
    "ActiveFlowError", "Engine", "EngineStats", "FetchError", "GGUFError", "InvalidArgumentError", "ModelConfig",
    "PerplexityResult", "PromptTooLongError", "SamplingParams", "StoreCorruptError", "StoreError",
    "UnsupportedModelError", "convert", "engine_perplexity", "fetch_default_model",
]
