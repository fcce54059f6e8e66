"""Sample quality of a checkpoint: accuracy by a reference classifier, and the NLL bound (used by `evaluate`).

Sample accuracy: sample images for each class at each guidance scale (text models: the class's caption
under each template; class models: the label) and count how often the dataset's reference classifier,
trained on real images, recognizes the requested class. Unconditional models: the fraction of samples
in each class (do samples cover every class?). NLL: the variational bound in bits/dim on the eval split.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import images as images_lib
from diffusion_jax import generation
from diffusion_jax.diffusion import vlb
from diffusion_jax.errors import UserError
from diffusion_jax.inference import LoadedModel


def reference_classifier(dataset):
  """(classifier with .predict(uint8 images) → labels, its accuracy on real test images) of a dataset,
  or a UserError if the dataset has none."""
  if dataset.reference_classifier is None:
    raise UserError(f"dataset {dataset.name!r} has no reference classifier, so sample accuracy cannot be "
                    f"measured; evaluate the NLL only (--guidance_scales is not used then)")
  return dataset.reference_classifier()


def sample_accuracy(loaded: LoadedModel, guidance_scales: Sequence[float], *, num_per_class: int,
                    num_steps: int, seed: int, templates: Sequence[int] = (0,), eta: float = 0.0
                    ) -> dict[str, float]:
  """{'classifier_test_accuracy', 'accuracy/…/guidance_<s>', …} from one compiled sampler call.

  Text models: 'accuracy/template_<i>/guidance_<s>'; class models: 'accuracy/guidance_<s>';
  unconditional models: 'class_fraction/<label>' and 'min_class_fraction' (no guidance).
  """
  run = loaded.run
  classifier, test_accuracy = reference_classifier(run.dataset)
  kind, labels_all = run.conditioning.kind, list(run.dataset.canonical_labels)
  requests, labels, scales, keys = [], [], [], []
  if kind == "none":
    total = num_per_class * len(labels_all)
    requests, scales, keys = [None] * total, [1.0] * total, ["none"] * total
  else:
    for template in (templates if kind == "text" else (None,)):
      for scale in guidance_scales:
        for label in labels_all:
          request = run.dataset.caption_for(label, template) if kind == "text" else label
          key = f"accuracy/template_{template}/guidance_{scale:g}" if kind == "text" else f"accuracy/guidance_{scale:g}"
          requests += [request] * num_per_class
          labels += [label] * num_per_class
          scales += [scale] * num_per_class
          keys += [key] * num_per_class
  options = generation.sampler_options(loaded.config, sampler="ddim", num_steps=num_steps, eta=eta)
  sample_fn = generation.make_sample_fn(run.model, run.schedule, options, run.autoencoder)
  images = generation.generate(sample_fn, loaded.params, run.conditioning, requests, scales, seed)
  predicted = classifier.predict(images_lib.to_uint8(images))
  metrics = {"classifier_test_accuracy": test_accuracy}
  if kind == "none":
    fractions = {label: float(np.mean(predicted == label)) for label in range(run.dataset.num_classes)}
    metrics.update({f"class_fraction/{label}": f for label, f in fractions.items()})
    metrics["min_class_fraction"] = min(fractions.values())
    return metrics
  correct, keys_array = predicted == np.asarray(labels), np.asarray(keys)
  for name in dict.fromkeys(keys):
    metrics[name] = float(correct[keys_array == name].mean())
  return metrics


def nll_bits_per_dim(loaded: LoadedModel, *, split: str | None = None, num_timesteps: int | None = 100,
                     model_variance: str = "fixed_large", seed: int = 0) -> dict[str, float]:
  """Negative log-likelihood bound (DDPM's L_vlb) in bits/dim over `split` (default: the dataset's eval
  split), conditioned on each example's caption or label for conditional models.

  num_timesteps=None sums all T terms (exact in t, T network calls per image); K < T gives an unbiased
  estimate from K random timesteps per batch. Returns {'nll_bits_per_dim', 'nll_num_images'}.
  """
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (grain/TFDS)
  run, config = loaded.run, loaded.config
  keys = tuple(run.conditioning.input_keys)

  @jax.jit
  def batch_bpd(images_uint8, inputs, rng):
    predict = lambda x_t, t: run.model.apply({"params": loaded.params}, x_t, t, inputs)
    return vlb.bits_per_dim(predict, run.autoencoder.encode(images_uint8), run.schedule, rng,
                            prediction_type=config.diffusion.prediction_type, model_variance=model_variance,
                            num_timesteps=num_timesteps)

  values = []
  tokenizer = getattr(run.conditioning, "tokenizer", None)
  for i, batch in enumerate(pipeline.iterate_split(config, split or run.dataset.eval_split, tokenizer=tokenizer)):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    inputs = {k: jnp.asarray(batch[k]) for k in keys}
    values.append(np.asarray(batch_bpd(jnp.asarray(batch["image"]), inputs, rng)))
  values = np.concatenate(values)
  return {"nll_bits_per_dim": float(values.mean()), "nll_num_images": float(len(values))}
