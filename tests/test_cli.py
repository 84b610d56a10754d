"""The `activeflow` command: real subprocesses, exit codes, no tracebacks on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, env_home=None, timeout=600):
    env = dict(os.environ)
    if env_home is not None:
        env["ACTIVEFLOW_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "activeflow_jax", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("activeflow: error:") or "error:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_convert_generate_and_ppl_on_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "store"
    proc = run_cli("convert", tiny_model.gguf_path, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    proc = run_cli("generate", "hello", "--store", out, "--max-new-tokens", "5", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "decode" in proc.stderr and "tok/s" in proc.stderr
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 60)
    proc = run_cli("ppl", text, "--store", out, "--ctx", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ctx"] == 64 and record["ppl"] > 1 and record["scored_tokens"] == record["windows"] * 31


def test_bad_inputs_give_clear_errors(tiny_model, tmp_path):
    assert_clean_error(run_cli("convert", tmp_path / "missing.gguf", tmp_path / "s"), "not found")
    assert_clean_error(run_cli("generate", "x", "--store", tmp_path / "nostore"), "store")
    assert_clean_error(run_cli("ppl", tmp_path / "missing.txt", "--store", tiny_model.store_path), "not found")
    assert_clean_error(run_cli("generate", "x", "--store", tiny_model.store_path, "--temperature", "-1"),
                       "temperature")
    assert_clean_error(run_cli("generate", "x", "--store", tiny_model.store_path, "--max-new-tokens", "0"),
                       "max_new_tokens")
    # converting another model onto an existing store without --overwrite is refused and leaves it intact
    from activeflow_jax.testing import write_tiny_gguf

    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=5)
    assert_clean_error(run_cli("convert", other, tiny_model.store_path), "overwrite")
    assert run_cli("generate", "x", "--store", tiny_model.store_path, "--max-new-tokens", "2").returncode == 0


@pytest.mark.real_model
def test_readme_first_command_answers(real_store):
    # what the README's first command runs once installed
    proc = run_cli("generate", "--chat", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_calibrate_then_generate_sparse(tiny_model, tmp_path):
    from activeflow_jax.testing import write_tiny_gguf

    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf, seed=3)
    store = tmp_path / "store"
    assert run_cli("convert", gguf, store).returncode == 0
    # no thresholds yet: a clear error that says how to calibrate
    assert_clean_error(run_cli("generate", "hi", "--store", store, "--sparsity", "0.5"), "activeflow calibrate")
    assert_clean_error(run_cli("generate", "hi", "--store", store, "--sparsity", "0.99"), "sparsity must be")
    text = tmp_path / "calib.txt"
    text.write_text("A short story about a lighthouse keeper and the sea birds he counted every morning. " * 30)
    proc = run_cli("calibrate", "--store", store, "--text", text, "--levels", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated 0.5" in proc.stdout
    proc = run_cli("generate", "hi", "--store", store, "--sparsity", "0.5", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(run_cli("generate", "hi", "--store", store, "--sparsity", "0.6"), "calibrated levels: 0.5")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert_clean_error(run_cli("calibrate", "--store", store, "--text", short), "too short")
    proc = run_cli("eval", text, "--store", store, "--sparsities", "0.5", "--ctx", "64", "--max-windows", "2")
    assert proc.returncode == 0, proc.stderr
    assert "| TEAL 50% |" in proc.stdout
    proc = run_cli("eval", text, "--store", store, "--reference-store", store, "--sparsities", "0.5", "--ctx", "64",
                   "--max-windows", "2")
    assert proc.returncode == 0, proc.stderr
    assert "against the dense model of" in proc.stdout and "| TEAL 50% |" in proc.stdout
    assert_clean_error(run_cli("eval", text, "--store", store, "--reference-store", tmp_path / "nowhere",
                               "--max-windows", "1"), "nowhere")
    # a per-op allocation: searched, evaluated, generated with; bad ones are clear errors
    proc = run_cli("allocate", "--store", store, "--text", text, "--ctx", "64", "--windows", "1", "--step", "0.2",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["sparsity"] >= 0.5 - 1e-4 and found["kl"] <= found["uniform_kl"]
    proc = run_cli("eval", text, "--store", store, "--sparsities", "0.5", "--policies", "topk", "--ctx", "64",
                   "--max-windows", "2", "--op-sparsity", found["op_sparsity"])
    assert proc.returncode == 0, proc.stderr
    assert "| top-k allocated |" in proc.stdout
    proc = run_cli("generate", "hi", "--store", store, "--policy", "topk", "--max-new-tokens", "4",
                   "--op-sparsity", "qkv=0.3,o=0.5,gate_up=0.3,down=0.7")
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(run_cli("generate", "hi", "--store", store, "--op-sparsity", "qkv=0.3,o=0.5,gate_up=0.3,down=0.7"),
                       "no thresholds for sparsity 0.3")
    assert_clean_error(run_cli("generate", "hi", "--store", store, "--op-sparsity", "qkv=0.3,o=0.5"), "each op group once")


def test_distill_command(tmp_path):
    from activeflow_jax.testing import write_tiny_gguf

    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf, seed=4)
    store = tmp_path / "store"
    assert run_cli("convert", gguf, store).returncode == 0
    text = tmp_path / "t.txt"
    text.write_text("The harbour master logged every ship that came in before the storm. " * 40)
    assert run_cli("calibrate", "--store", store, "--text", text, "--levels", "0.5").returncode == 0
    out = tmp_path / "distilled"
    args = ("distill", "--store", store, "--text", text, "--out", out, "--steps", "2", "--seq-len", "32",
            "--save-every", "1")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "distilled 2 steps" in proc.stdout and (out / "manifest.json").exists()
    assert_clean_error(run_cli(*args), "exists")  # no --overwrite
    assert_clean_error(run_cli(*args, "--overwrite", "--merge-alpha", "most"), "--merge-alpha must be")
    assert_clean_error(run_cli(*args, "--overwrite", "--merge-alpha", "1.5"), "merge must be")
    assert_clean_error(run_cli(*args, "--overwrite", "--members", "0"), "members must be")
    assert_clean_error(run_cli(*args, "--overwrite", "--text", "wikipdia"), "neither a file nor a shipped corpus")
    assert run_cli("generate", "hi", "--store", out, "--sparsity", "0.5", "--max-new-tokens", "2").returncode == 0


def test_distill_asks_glibc_for_huge_pages_once():
    from activeflow_jax.cli import HUGEPAGE_TUNABLE, malloc_hugepage_env

    env = malloc_hugepage_env({"PATH": "/bin"})
    if env is None:  # not Linux with glibc: nothing to tune
        assert not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc"
        return
    assert env["GLIBC_TUNABLES"] == HUGEPAGE_TUNABLE and env["PATH"] == "/bin"
    assert malloc_hugepage_env(env) is None  # the re-executed process does not loop
    kept = malloc_hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}"
    assert malloc_hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands
