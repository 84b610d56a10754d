"""The flash store: layout, writer (convert) and reader."""

from activeflow_jax.store.layout import LAYOUT_VERSION
from activeflow_jax.store.reader import StoreReader, read_manifest
from activeflow_jax.store.writer import convert, write_store

__all__ = ["LAYOUT_VERSION", "StoreReader", "convert", "read_manifest", "write_store"]
