"""Exceptions that make up the error interface of activeflow_jax.

Every failure a user can cause (bad files, bad arguments, a damaged store) is raised as a
subclass of `ActiveFlowError` with a message that says what is wrong and what to do. The CLI
prints these without a traceback; anything else is a bug in activeflow_jax.
"""

from __future__ import annotations


class ActiveFlowError(Exception):
    """Base class of every user-facing error."""


class GGUFError(ActiveFlowError):
    """The GGUF file is missing, truncated or malformed."""


class UnsupportedModelError(ActiveFlowError):
    """The model's architecture, tensor type or tokenizer is not supported."""


class StoreError(ActiveFlowError):
    """The flash store is missing, incomplete or of another layout version."""


class StoreCorruptError(StoreError):
    """A chunk of the flash store failed its checksum or could not be read."""


class NonFiniteWeightsError(ActiveFlowError):
    """A tensor to be written holds NaN or Inf (a damaged source, or float16 overflow)."""


class InvalidArgumentError(ActiveFlowError, ValueError):
    """An argument (prompt, sampling parameter, path, ...) is not acceptable."""


class PromptTooLongError(InvalidArgumentError):
    """The prompt plus the requested new tokens do not fit into the context window."""


class FetchError(ActiveFlowError):
    """Downloading or verifying the default model failed."""


class MappingLimitError(ActiveFlowError):
    """The process is near the kernel's limit on memory mappings (vm.max_map_count), which compiled
    programs use up; compiling more would crash the interpreter."""
