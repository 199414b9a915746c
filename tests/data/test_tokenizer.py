import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.data import ByteTokenizer


@settings(max_examples=30, deadline=None)
@given(st.text())
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.shape == (len(text.encode("utf-8")),)
    assert tok.decode(ids) == text


def test_specials_and_bytes():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    ids = tok.encode(b"\x00\xffa", add_bos=True, add_eos=True)
    np.testing.assert_array_equal(ids, [257, 0, 255, 97, 258])
    assert tok.decode([257, 104, 105, 258, 256]) == "hi"


def test_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="text"):
        tok.encode(123)
    with pytest.raises(ValueError, match="ids"):
        tok.decode([1, 259])
