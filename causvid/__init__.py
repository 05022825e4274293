"""causvid: fast autoregressive video diffusion by asymmetric distillation (CausVid), in PyTorch.

Tensor layouts used everywhere outside the DiT:
    latents      [B, F, C, H, W]   frame-major, so causal chunks are slices on F
    timesteps    [B, F]            t in [0, 1000], sigma = t / 1000, one value per latent frame
    videos       [B, T, 3, H, W]   pixels in [-1, 1], T = 1 + 4 (F - 1)
    text context [B, L, D_text]    padded to the model's text_len with zeros past the prompt
Inside the DiT tokens are [B, F*h*w, D] with h, w the patch grid.
"""

__version__ = "0.1.0"
