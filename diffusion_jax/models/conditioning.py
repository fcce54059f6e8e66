"""The conditioning seam: what a model is conditioned on, its inputs, and their null value for guidance.

Three kinds (config `model.conditioning`):
- `text`: a prompt, tokenized (`tokens` int32 [B, L]) and encoded by a text encoder into cross-attention
  context [B, L, D] + mask [B, L] and a pooled embedding [B, D]. Null input: the empty prompt.
- `class`: a class label (`label` int32 [B] in [0, num_classes)), embedded into a pooled embedding added
  to the timestep embedding (as the class-conditional models of Ho & Salimans 2022). Null input: the
  extra label `num_classes`.
- `none`: unconditional (DDPM); no inputs, no guidance.

Host side (`Conditioning` objects, numpy only): which batch keys a kind reads, its null inputs, and how a
user's request (prompts or labels) becomes inputs. Device side (`encode`, inside the Flax model): inputs →
the `cond` pytree the U-Net takes ({'context', 'context_mask', 'pooled'}, or a subset). Guidance treats the
kinds alike: the unconditional branch gets the null inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UserError
from diffusion_jax.models import initializers, layers

KINDS = ("text", "class", "none")


class TextConditioning:
  """Prompts → `tokens` int32 [B, L] through `tokenizer` (the null input is the empty prompt)."""

  kind = "text"
  input_keys = ("tokens",)

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def inputs_for(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    return {"tokens": self.tokenizer.encode_batch(list(prompts))}

  def null_inputs(self, n: int, negative_prompt: str = "") -> dict[str, np.ndarray]:
    """The unconditional branch: `negative_prompt` ('' by default) for each of n images."""
    return {"tokens": np.repeat(self.tokenizer.encode(negative_prompt)[None], n, axis=0)}


class ClassConditioning:
  """Labels → `label` int32 [B]; the null label is `num_classes`."""

  kind = "class"
  input_keys = ("label",)

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def inputs_for(self, labels: Sequence[int]) -> dict[str, np.ndarray]:
    labels = np.asarray(labels, np.int32).reshape(-1)
    bad = [int(l) for l in labels if not 0 <= l < self.num_classes]
    if bad:
      raise UserError(f"labels {sorted(set(bad))} are out of range; this model has classes 0 to {self.num_classes - 1}")
    return {"label": labels}

  def null_inputs(self, n: int, negative_prompt: str = "") -> dict[str, np.ndarray]:
    if negative_prompt:
      raise UserError("a negative prompt needs a text model; this model is class-conditional")
    return {"label": np.full((n,), self.num_classes, np.int32)}


class NoConditioning:
  """Unconditional models: no inputs; sampling runs without guidance."""

  kind = "none"
  input_keys = ()

  def inputs_for(self, requests: Sequence[Any]) -> dict[str, np.ndarray]:
    del requests
    return {}

  def null_inputs(self, n: int, negative_prompt: str = "") -> dict[str, np.ndarray]:
    del n
    if negative_prompt:
      raise UserError("a negative prompt needs a text model; this model is unconditional")
    return {}


def select_inputs(batch: dict[str, Any], conditioning) -> dict[str, Any]:
  """The conditioning inputs among a batch's fields (e.g. {'tokens': …} of {'image', 'tokens', 'label'})."""
  return {k: batch[k] for k in conditioning.input_keys}


def drop_to_null(inputs: dict[str, jax.Array], null: dict[str, jax.Array], keep: jax.Array) -> dict[str, jax.Array]:
  """Per example, the inputs where `keep` [B] is True, else the null inputs (null leaves are [1, …])."""
  return {k: jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, null[k]) for k, v in inputs.items()}


class ClassEmbedding(nn.Module):
  """label int32 [B] in [0, num_classes] (num_classes = null) → pooled embedding [B, width]."""

  num_classes: int
  width: int

  @nn.compact
  def __call__(self, label: jax.Array) -> jax.Array:
    layers.check_shape("label", label, (None,))
    table = self.param("embedding", initializers.normal(1.0, ("vocab", "embed")),
                       (self.num_classes + 1, self.width))
    return jnp.take(table, label, axis=0)
