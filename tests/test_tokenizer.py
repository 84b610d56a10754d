"""Tokenizer from GGUF metadata: exact round trip, SmolLM's digit split, specials, chat, streaming."""

from __future__ import annotations

import pytest

from activeflow_jax.errors import InvalidArgumentError, UnsupportedModelError
from activeflow_jax.formats.tokenizer import StreamDecoder, Tokenizer

SAMPLES = [
    "What is the capital of France?",
    "In 2023, 12345 people",
    " leading space\n\ntabs\tand  double  spaces ",
    "héllo wörld — naïve café",
    "emoji 😀👍🏽 and CJK 世界",
    "code: def f(x):\n    return x**2  # comment\r\n",
    "",
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_engine):
    return tiny_engine.tokenizer


@pytest.fixture(scope="module")
def real_tok(real_gguf_path):
    from activeflow_jax.formats.gguf_import import open_gguf

    return Tokenizer.from_spec(open_gguf(real_gguf_path).tokenizer_spec)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tiny_tok, text):
    assert tiny_tok.decode(tiny_tok.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact_real(real_tok, text):
    assert real_tok.decode(real_tok.encode(text)) == text


def test_real_vocabulary_known_ids(real_tok):
    ids = real_tok.encode("What is the capital of France?")
    assert [real_tok.id_to_token(i) for i in ids] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    # SmolLM's pre-tokenizer splits digits one by one
    digits = real_tok.encode("12345")
    assert [real_tok.id_to_token(i) for i in digits] == list("12345")
    assert real_tok.encode("<|im_start|>user")[0] == 1 and real_tok.token_to_id("<|im_end|>") == 2
    assert real_tok.bos_id == 1 and real_tok.eos_id == 2 and real_tok.add_bos is False
    assert {0, 2} <= real_tok.stop_ids  # <|endoftext|> and <|im_end|>
    assert real_tok.vocab_size == 49152


def test_special_tokens_are_skipped_on_decode(real_tok):
    ids = real_tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert real_tok.decode(ids) == "user\nHi"
    assert real_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_chat_template_is_the_models_own(real_tok):
    text = real_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = real_tok.encode_chat("Hi", system="Be brief.")
    assert real_tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    tail = real_tok.encode("<|im_start|>assistant\n")
    assert ids[-len(tail):] == tail


def test_bad_chat_messages(real_tok):
    with pytest.raises(InvalidArgumentError, match="role"):
        real_tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(InvalidArgumentError, match="str"):
        real_tok.encode_chat(123)


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder_yields_whole_characters(real_tok, text):
    decoder = StreamDecoder(real_tok)
    pieces = [decoder.push(i) for i in real_tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_flushes_a_cut_character(real_tok):
    ids = real_tok.encode("😀")
    decoder = StreamDecoder(real_tok)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == "\ufffd"


def test_out_of_range_id(real_tok):
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        real_tok.decode([49152])


def test_non_string_text(tiny_tok):
    with pytest.raises(InvalidArgumentError):
        tiny_tok.encode(b"bytes")


def test_unsupported_tokenizer_model_is_refused(tmp_path):
    import gguf

    from activeflow_jax.formats.gguf_import import open_gguf
    from activeflow_jax.testing import write_tiny_gguf

    path = tmp_path / "bert.gguf"
    write_tiny_gguf(path)
    # rewrite the file with a SentencePiece tokenizer model name
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "spm2.gguf", "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.model":
            value = "bert"
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(n) for n in t.shape])), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert'.*supported: 'gpt2'.*'llama'"):
        open_gguf(tmp_path / "spm2.gguf")
