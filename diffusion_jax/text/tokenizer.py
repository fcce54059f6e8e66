"""Byte-level tokenizer: UTF-8 bytes plus PAD/BOS/EOS, fixed length.

Token ids: PAD = 0, BOS = 1, EOS = 2, byte b ↦ b + 3 (vocabulary size 259). Every prompt becomes
`[BOS, bytes…, EOS, PAD…]` of exactly `max_length` tokens. A prompt that does not fit is an error
(never silently truncated: a cut-off prompt would condition on a different text than was asked).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffusion_jax.errors import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_BYTE_OFFSET = 3
VOCAB_SIZE = 256 + _BYTE_OFFSET


class ByteTokenizer:
  """Encodes prompts to int32 token arrays of length `max_length`."""

  vocab_size = VOCAB_SIZE

  def __init__(self, max_length: int):
    if max_length < 2:
      raise UserError(f"text.max_length={max_length} must be at least 2 (BOS and EOS)")
    self.max_length = max_length

  @property
  def max_prompt_bytes(self) -> int:
    return self.max_length - 2

  def encode(self, prompt: str | bytes) -> np.ndarray:
    """Returns int32 [max_length]."""
    data = prompt if isinstance(prompt, bytes) else prompt.encode("utf-8")
    if len(data) > self.max_prompt_bytes:
      text = data.decode("utf-8", errors="replace")
      raise UserError(
          f"prompt {text!r} is {len(data)} bytes long; text.max_length={self.max_length} allows at "
          f"most {self.max_prompt_bytes} bytes (max_length counts BOS and EOS)")
    tokens = np.full((self.max_length,), PAD_ID, dtype=np.int32)
    tokens[0] = BOS_ID
    tokens[1:len(data) + 1] = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + _BYTE_OFFSET
    tokens[len(data) + 1] = EOS_ID
    return tokens

  def encode_batch(self, prompts: Sequence[str | bytes]) -> np.ndarray:
    """Returns int32 [len(prompts), max_length]."""
    return np.stack([self.encode(p) for p in prompts]) if prompts else np.zeros((0, self.max_length), np.int32)

  def decode(self, tokens: np.ndarray) -> str:
    """Inverse of `encode` for one prompt."""
    ids = [int(t) for t in np.asarray(tokens) if int(t) >= _BYTE_OFFSET]
    return bytes(i - _BYTE_OFFSET for i in ids).decode("utf-8", errors="replace")


def padding_mask(tokens):
  """[B, L] bool, True where a real token (BOS, bytes, EOS) stands. Works on numpy and jax arrays."""
  return tokens != PAD_ID
