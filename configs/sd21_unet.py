"""The Stable Diffusion 2.1 (512-base) U-Net and training recipe (Stability AI v2 config, SD 2 model
card), on 64×64×4 latents of 512×512 images: 865,910,724 U-Net parameters, the released count.

`configs/sd15_unet.py` changed where SD 2.x changes it: heads of 64 channels (5, 10, 20 heads at 320,
640, 1280 channels) instead of 8 heads, linear proj_in/proj_out, cross-attention to 77 tokens of width
1024 (OpenCLIP ViT-H/14's text transformer, penultimate layer). ε-prediction as the 512-base model (the
768 model predicts v: --config.diffusion.prediction_type=v at image_size 768). 2.0-base trained 550k
steps at 256² then 850k at 512²; 2.1-base continued 220k steps. The model card's batch (2048) and its
text-dropping rate are not stated unambiguously; this config keeps SD 1.5's (2048, 10%).

The same limits as sd15_unet apply (jointly trained text encoder at ViT-H's width, autoencoder from
random weights, no registered 512×512 text-image dataset); see REPRODUCE.md.
"""

from configs import sd15_unet


def get_config():
  config = sd15_unet.get_config()
  te = config.model.text_encoder  # The width and depth of OpenCLIP ViT-H/14's text transformer.
  te.width, te.depth, te.num_heads, te.mlp_ratio = 1024, 24, 16, 4

  unet = config.model.unet
  unet.num_heads = 0
  unet.head_dim = 64  # num_head_channels.
  unet.use_linear_projection = True

  config.num_train_steps = 220_000  # 2.1-base, continued from 2.0-base.
  return config
