import pytest

from llmesh.common.detokenizer import StreamDecoder
from llmesh.lm.build import train_tokenizer

TEXT = "Return the number of items — naïve café 🎉 日本語 and so on.\n  Indented line\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT * 20 + "plain words only " * 50, vocab_size=300)


def _stream(tokenizer, text, stop=None):
    decoder = StreamDecoder(tokenizer, stop)
    deltas = [decoder.push([i]) for i in tokenizer.encode(text).ids]
    deltas.append(decoder.finish())
    return decoder, deltas


def test_token_by_token_equals_whole_decode(tokenizer):
    decoder, deltas = _stream(tokenizer, TEXT)
    assert "".join(deltas) == TEXT == decoder.text


def test_no_delta_holds_a_broken_character(tokenizer):
    _, deltas = _stream(tokenizer, TEXT)
    assert all("\ufffd" not in d for d in deltas)
    # multi-byte characters take several byte-level tokens: some pushes must emit nothing
    assert any(d == "" for d in deltas[:-1])


def test_stop_string_truncates_and_ends(tokenizer):
    decoder, deltas = _stream(tokenizer, TEXT, stop=["日本"])
    assert "".join(deltas) == "Return the number of items — naïve café 🎉 "
    assert decoder.stopped
    assert decoder.push(tokenizer.encode("more").ids) == ""


def test_text_that_only_starts_a_stop_string_is_released_at_the_end(tokenizer):
    decoder, deltas = _stream(tokenizer, "plain words", stop=["words only"])
    assert "".join(deltas) == "plain words"
    assert not decoder.stopped
