#!/usr/bin/env python
"""Train a tiny streaming decoder for a VAE's latents (docs/vae.md, "Tiny decoder").

    python scripts/train_decoder.py --vae runs/toy/vae/vae.safetensors --config configs/toy/vae.yaml \
        --out runs/toy/tiny_decoder [steps=1000 batch_size=8 channels=64 target=frames ...]

Training videos: the config's toy world (or ``--videos DIR`` for a folder of videos, with ``data.*`` sizes);
held-out videos: the toy world at another seed (or the last ``eval_videos`` of the folder). Writes
``decoder.safetensors`` (load with ``causvid.models.tiny_decoder.load_tiny_decoder``; use it with
``CausalSampler(..., decoder=...)`` or ``scripts/sample.py --decoder PATH``) and ``metrics.json``.
"""

import sys

from causvid.train.decoder_cli import main

if __name__ == "__main__":
    sys.exit(main())
