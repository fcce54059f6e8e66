import numpy as np
import pytest

from diffusion_jax.errors import UserError
from diffusion_jax.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, padding_mask


def test_encode_layout_and_round_trip():
  tok = ByteTokenizer(16)
  ids = tok.encode("hi 7")
  assert ids.dtype == np.int32 and ids.shape == (16,)
  np.testing.assert_array_equal(ids[:6], [BOS_ID, ord("h") + 3, ord("i") + 3, ord(" ") + 3, ord("7") + 3, EOS_ID])
  assert (ids[6:] == PAD_ID).all()
  assert tok.decode(ids) == "hi 7"
  assert ids.max() < VOCAB_SIZE


def test_utf8_multibyte_counts_bytes():
  tok = ByteTokenizer(8)
  assert tok.decode(tok.encode("été")) == "été"  # 5 bytes + BOS + EOS = 7 tokens.
  with pytest.raises(UserError, match="7 bytes"):
    tok.encode("ééé" + "x")


def test_empty_prompt_is_bos_eos():
  ids = ByteTokenizer(4).encode("")
  np.testing.assert_array_equal(ids, [BOS_ID, EOS_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(padding_mask(ids), [True, True, False, False])


def test_too_long_prompt_is_a_clear_error():
  tok = ByteTokenizer(10)
  tok.encode("x" * 8)  # Exactly fits.
  with pytest.raises(UserError, match=r"9 bytes long; text.max_length=10 allows at most 8 bytes"):
    tok.encode("x" * 9)


def test_batch():
  tok = ByteTokenizer(12)
  batch = tok.encode_batch(["a", "bb"])
  assert batch.shape == (2, 12)
  assert [tok.decode(b) for b in batch] == ["a", "bb"]
