"""Tokenizer from GGUF metadata, built on Hugging Face `tokenizers`.

Two kinds (`tokenizer.ggml.model`):
- "gpt2": a byte-level BPE vocabulary (tokens, token types, merges) and the name of the
  pre-tokenizer (`tokenizer.ggml.pre`): SmolLM, Llama 3, Qwen2, StarCoder.
- "llama": a SentencePiece vocabulary (tokens, scores, token types with <0xXX> byte tokens), as
  Gemma and Llama 2 ship it. llama.cpp tokenizes it by repeatedly merging the adjacent pair whose
  concatenation is the highest-scoring token (leftmost first among equals), spaces written as
  U+2581, unknown characters as their UTF-8 bytes. We build the same thing as a `tokenizers` BPE
  whose merges are ranked by the merged token's score, with byte fallback; the space prefix
  only where the GGUF asks for it (`tokenizer.ggml.add_space_prefix`; Gemma 3 does not).
 We keep those raw fields in the store's
manifest (the *spec*) and build the `tokenizers` object from them at load time, so the store
never depends on the serialization format of one `tokenizers` release.

Text -> ids goes through `tokenizers` (exact, fast). Ids -> text for streaming goes through the
byte-level alphabet directly: every byte-level token is a fixed byte string, so an incremental
UTF-8 decoder yields exactly the characters that are complete, never a half emoji.
"""

from __future__ import annotations

import codecs
import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from activeflow_jax.errors import ActiveFlowError, InvalidArgumentError, UnsupportedModelError

SPEC_VERSION = 1

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn / end-of-text spellings of the model families we know; generation stops at any that
# the vocabulary holds as a control token, besides the declared eos / eot ids.
_STOP_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")

# llama.cpp pre-tokenizer names -> the `tokenizers` pre-tokenizer that reproduces them.
_DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact", "codeshell")
_BYTELEVEL_ONLY = ("gpt-2", "gpt2", "default")
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama-bpe", "llama3")
# Qwen2's pre-tokenizer: Llama 3's pattern with single digits (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_NAMES = ("qwen2",)
SUPPORTED_PRE_TOKENIZERS = _DIGITS_THEN_BYTELEVEL + _BYTELEVEL_ONLY + _LLAMA3_NAMES + _QWEN2_NAMES
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_spec_from_gguf(reader: Any, models: tuple[str, ...] = SUPPORTED_TOKENIZER_MODELS) -> dict[str, Any]:
    """The tokenizer fields of a GGUF file as a JSON-serializable dict (stored in the manifest).
    models: the tokenizer kinds the model's family ships with."""
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise UnsupportedModelError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"tokenizer model '{model}' is not supported yet; supported: 'gpt2' (byte-level BPE: SmolLM, Llama 3, "
            "Qwen, StarCoder) and 'llama' (SentencePiece vocabulary with scores: Gemma, Llama 2)"
        )
    if model not in models:
        raise UnsupportedModelError(f"tokenizer model '{model}' is not one this architecture ships with "
                                    f"({', '.join(models)})")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre not in SUPPORTED_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"pre-tokenizer '{pre}' is not supported yet; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    if not tokens or len(types) != len(tokens):
        raise UnsupportedModelError("the GGUF tokenizer is incomplete (no tokens, or token types do not match)")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    extra: dict[str, Any] = {}
    if model == "llama":
        scores = [float(x) for x in _field(reader, "tokenizer.ggml.scores", [])]
        if len(scores) != len(tokens):
            raise UnsupportedModelError("the GGUF SentencePiece tokenizer has no scores for its tokens")
        unk = _field(reader, "tokenizer.ggml.unknown_token_id")
        # llama.cpp's default for SentencePiece vocabularies is to add the space prefix
        extra = {"scores": scores, "add_space_prefix": bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
                 "unk_id": None if unk is None else int(unk)}
    return {
        "version": SPEC_VERSION,
        "model": model,
        "pre": pre,
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "bos_id": None if bos is None else int(bos),
        "eos_id": None if eos is None else int(eos),
        "eot_id": None if eot is None else int(eot),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        **extra,
    }


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def spm_vocab(tokens: Sequence[str]) -> dict[str, int]:
    """{token text: its first id} (a SentencePiece vocabulary may repeat a text)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


BUILD_ONLY_FIELDS = ("merges", "scores")  # tokenizer spec fields read only to build the `tokenizers` object


def spm_merges(tokens: Sequence[str], scores: Sequence[float],
               vocab: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """BPE merges that make a `tokenizers` BPE tokenize like llama.cpp's SentencePiece session:
    every split (left, right) of a token into two tokens, ranked by the merged token's score
    (highest first; then by token id and the left part's id), so the pair merged first is the one
    whose concatenation scores highest. Yields them in rank order.

    The candidates are collected as compact arrays and only the ranked pairs become strings: a
    262k-token vocabulary (Gemma 3) has ~515k of them, and a Python tuple per candidate with its
    sort key cost ~50 MB more at the peak of loading and ~30 MB after. (Handing `tokenizers` the
    merges as JSON text instead, to skip the Python list, was measured: it took 210 MB more.)
    vocab: {token: its first id}, if the caller has it (spm_vocab)."""
    import array

    vocab = spm_vocab(tokens) if vocab is None else vocab
    ids, cuts, lefts = array.array("q"), array.array("q"), array.array("q")
    for tok, i in vocab.items():
        for cut in range(1, len(tok)):
            left = vocab.get(tok[:cut])
            if left is not None and tok[cut:] in vocab:
                ids.append(i)
                cuts.append(cut)
                lefts.append(left)
    ids, cuts, lefts = (np.frombuffer(a, np.int64) for a in (ids, cuts, lefts))
    rank = -np.asarray(scores, np.float64)[ids] if len(ids) else np.zeros(0)
    order = np.lexsort((lefts, ids, rank))  # the last key sorts first: score, then token id, then left id
    for i, c in zip(ids[order].tolist(), cuts[order].tolist()):
        yield tokens[i][:c], tokens[i][c:]


def _build_spm_tokenizer(spec: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens, types = spec["tokens"], spec["token_types"]
    vocab = spm_vocab(tokens)
    unk = spec.get("unk_id")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=list(spm_merges(tokens, spec["scores"], vocab)), byte_fallback=True,
                                unk_token=tokens[unk] if unk is not None else None, fuse_unk=False,
                                ignore_merges=False))
    steps = [normalizers.Prepend(SPM_SPACE)] if spec["add_space_prefix"] else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # llama.cpp splits control, user-defined and unknown token texts out of the text first (with
    # special parsing on, as our encode does); Gemma's "\n", "\n\n", ... are user-defined tokens
    added = [
        AddedToken(tokens[i], special=types[i] != TOKEN_USER_DEFINED, normalized=False)
        for i in range(len(tokens))
        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
    ]
    if added:
        hf.add_tokens(added)
    return hf


def _build_hf_tokenizer(spec: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if spec["model"] == "llama":
        return _build_spm_tokenizer(spec)

    tokens, types = spec["tokens"], spec["token_types"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for merge in spec["merges"]:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise UnsupportedModelError(f"malformed BPE merge {merge!r} in the tokenizer")
        merges.append((left, right))
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False))
    except Exception as exc:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise UnsupportedModelError(f"the tokenizer is inconsistent ({exc}); the file or store is damaged: "
                                    "download or convert it again") from None
    pre = spec["pre"]
    if pre in _DIGITS_THEN_BYTELEVEL:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _LLAMA3_NAMES + _QWEN2_NAMES:
        pattern = _LLAMA3_PATTERN if pre in _LLAMA3_NAMES else _QWEN2_PATTERN
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    if added:
        hf.add_tokens(added)
    return hf


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and stop tokens."""

    def __init__(self, spec: dict[str, Any]):
        if spec.get("version") != SPEC_VERSION:
            raise UnsupportedModelError(
                f"tokenizer spec version {spec.get('version')} is not understood by this activeflow "
                f"(expects {SPEC_VERSION}); convert the model again"
            )
        self._hf = _build_hf_tokenizer(spec)
        # what encode/decode read later; the merges and scores only serve the build above (kept,
        # Gemma 3's scores and SmolLM2's merges would stay in the process: 4-10 MB of Python objects)
        self.spec = {k: v for k, v in spec.items() if k not in BUILD_ONLY_FIELDS}
        self._tokens: list[str] = spec["tokens"]
        self._types: list[int] = spec["token_types"]
        self.bos_id: int | None = spec["bos_id"]
        self.eos_id: int | None = spec["eos_id"]
        self.add_bos: bool = spec["add_bos"] and self.bos_id is not None
        self.chat_template: str | None = spec["chat_template"]
        self.special_ids = frozenset(i for i, t in enumerate(self._types) if t == TOKEN_CONTROL)
        stops = {i for i in (self.eos_id, spec.get("eot_id")) if i is not None}
        stops |= {i for i in self.special_ids if self._tokens[i] in _STOP_TOKEN_TEXTS}
        self.stop_ids = frozenset(stops)
        self._lock = threading.Lock()  # a `tokenizers` object is not meant to be shared mid-call

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Tokenizer:
        try:
            return cls(spec)
        except ActiveFlowError:
            raise
        except Exception as exc:  # a damaged or edited spec (bench/fuzz.py): missing keys, wrong types
            raise UnsupportedModelError(f"the tokenizer description is damaged or incomplete ({type(exc).__name__}: "
                                        f"{str(exc)[:120]}); convert the store again") from None

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token spellings (e.g. '<|im_start|>') become their ids, as in
        Hugging Face. A BOS id is prepended when the model asks for one (or `add_bos=True`)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        with self._lock:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos:
            if self.bos_id is None:
                raise InvalidArgumentError("this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (a token sequence cut inside a character) becomes U+FFFD."""
        data = b"".join(self.token_bytes(i, skip_special_tokens=skip_special_tokens) for i in ids)
        text = data.decode("utf-8", errors="replace")
        if self.spec.get("add_space_prefix") and text.startswith(" "):
            text = text[1:]  # the space the SentencePiece prefix added (as Hugging Face's decoder strips it)
        return text

    def token_bytes(self, token_id: int, *, skip_special_tokens: bool = True) -> bytes:
        """The exact bytes one token stands for (b'' for a skipped special token)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self._tokens):
            raise InvalidArgumentError(f"token id {token_id} is outside the vocabulary [0, {len(self._tokens)})")
        kind = self._types[token_id]
        text = self._tokens[token_id]
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_UNKNOWN):
            if kind != TOKEN_USER_DEFINED and skip_special_tokens:
                return b""
            return text.encode("utf-8")
        if self.spec["model"] == "llama":  # SentencePiece: <0xXX> byte tokens, U+2581 for spaces
            if kind == TOKEN_BYTE:
                return bytes([int(text[3:5], 16)])
            return text.replace(SPM_SPACE, " ").encode("utf-8")
        table = _byte_decoder()
        try:
            return bytes(table[ch] for ch in text)
        except KeyError:  # not a byte-level token: take its text as is
            return text.encode("utf-8")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Renders the model's own chat template (Jinja, sandboxed) for a list of {role, content}."""
        if not self.chat_template:
            raise InvalidArgumentError("this model has no chat template; generate without chat=True")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgumentError(f"each chat message must be {{'role': str, 'content': str}}, got {m!r}")
        try:
            return _compiled_template(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id), eos_token=self._token_text(self.eos_id),
            )
        except InvalidArgumentError:
            raise
        except Exception as exc:  # template errors (jinja2) are the model's fault, say so plainly
            raise InvalidArgumentError(f"the model's chat template failed to render: {exc}") from None

    def encode_chat(self, prompt: str, *, system: str | None = None) -> list[int]:
        """Ids of a one-turn chat prompt, ready for the assistant's answer."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        return self.encode_messages(messages)

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        # like Hugging Face: the rendered template carries any BOS it wants; none is added
        return self.encode(self.apply_chat_template(messages), add_bos=False)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidArgumentError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class StreamDecoder:
    """Turns a stream of token ids into text pieces that hold only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, skip_special_tokens=self._skip))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
