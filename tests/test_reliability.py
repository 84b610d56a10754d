"""Reliability (issue 27): no hang, no data loss, repairs that repair, clear errors for every
user-caused failure. Tiny random stores, seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import activeflow_jax as af
from activeflow_jax.errors import ActiveFlowError, InvalidArgumentError


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "activeflow_jax", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def _in_thread(fn, timeout=60.0):
    """fn() run on another thread; its result, or the exception it raised. Fails on a hang."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout} s: the engine lock is held"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- 1. an unfinished stream never blocks the engine ------------------------------------------------

def test_unfinished_stream_does_not_block_other_threads(tiny_engine):
    expected = tiny_engine.generate("hello", max_new_tokens=6)
    stream = tiny_engine.stream("hello", max_new_tokens=20)
    next(stream)  # started, then left alone: neither exhausted nor closed
    assert _in_thread(lambda: tiny_engine.generate("hello", max_new_tokens=6)) == expected
    ids = tiny_engine.tokenizer.encode("hello")
    assert _in_thread(lambda: tiny_engine.logits(ids)).shape[0] == len(ids)
    del stream


def test_interleaved_streams_and_cross_thread_consumption(tiny_engine):
    prompts = ("the river", "a stone bridge")
    alone = [list(tiny_engine.generate_ids(tiny_engine.tokenizer.encode(p), max_new_tokens=8, stop_ids=frozenset()))
             for p in prompts]
    a, b = (tiny_engine.generate_ids(tiny_engine.tokenizer.encode(p), max_new_tokens=8, stop_ids=frozenset())
            for p in prompts)
    got_a, got_b = [], []
    for x, y in zip(a, b):  # one step of each in turn: each keeps its own KV cache
        got_a.append(x)
        got_b.append(y)
    assert [got_a, got_b] == alone
    c = tiny_engine.generate_ids(tiny_engine.tokenizer.encode(prompts[0]), max_new_tokens=8, stop_ids=frozenset())
    first = next(c)  # started here, finished on another thread
    assert [first] + _in_thread(lambda: list(c)) == alone[0]


def test_stream_of_a_closed_engine_fails_clearly(tiny_model):
    engine = af.Engine.load(tiny_model.store_path)
    stream = engine.stream("hello", max_new_tokens=10)
    next(stream)
    engine.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        list(stream)
    with pytest.raises(InvalidArgumentError, match="closed"):
        engine.generate("hello", max_new_tokens=2)
