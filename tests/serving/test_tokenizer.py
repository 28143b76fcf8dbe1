"""Tokenizer, chat template and incremental decoding on the default model, against transformers."""
import pytest
from transformers import AutoTokenizer

from prefloop.server.errors import InvalidArgument
from prefloop.server.model.loader import resolve_model_dir
from prefloop.server.serving.tokenizer import IncrementalDecoder, Tokenizer

pytestmark = pytest.mark.slow  # the default model's folder (converted from its GGUF on first use)


@pytest.fixture(scope="module")
def toks():
    d = resolve_model_dir(None)
    return Tokenizer(d), AutoTokenizer.from_pretrained(d)


def test_encode_and_chat_template_match_transformers(toks):
    ours, hf = toks
    text = "Héllo wörld — 你好 🙂"
    assert ours.encode(text) == hf(text)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert ours.encode_chat(messages) == list(expected)


def test_bad_messages(toks):
    ours, _ = toks
    with pytest.raises(InvalidArgument):
        ours.encode_chat([])
    with pytest.raises(InvalidArgument, match="role"):
        ours.encode_chat([{"role": "wizard", "content": "x"}])


def test_incremental_decoder_never_splits_characters_and_stops(toks):
    ours, _ = toks
    text = "Snow ❄️ falls. STOP here and never after"
    ids = ours.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(ours)
    pieces = [dec.push([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    dec = IncrementalDecoder(ours, stop=("STOP",))
    out = ""
    for t in ids:
        out += dec.push([t], final=False)
        if dec.stopped:
            break
    assert out == "Snow ❄️ falls. " and dec.stopped
