"""A tiny deterministic :class:`Stage` for the trainer tests, plus a script entry point for subprocess runs.

Two trainables alternated like DMD (``generator`` every ``ratio`` steps, ``critic`` every step), one
frozen ``teacher``, a 64-item map-style data set whose items carry their index (``idx``) so tests can
check the data order. Faults for tests:

* ``nan``: ``{(step, name): "loss" | "grad"}``: a NaN loss, or a finite loss with a NaN gradient;
  from the environment as ``DUMMY_NAN="3:generator:loss,4:critic:grad"`` (``*`` for every step);
* ``sleep``: seconds per loss call (env ``DUMMY_SLEEP``) so a subprocess can be signalled mid-run.

Script: ``python tests/helpers_dummy_stage.py OUT_DIR [dotlist overrides...]`` (also under
``accelerate launch``) trains with this stage and writes ``OUT_DIR/world_{rank}.json`` (world size,
rank, pid; written at setup, before the first step) and ``OUT_DIR/seen_{rank}.json`` (the sample ids
each loss call saw, as ``[step, name, ids]``, the run summary and a digest of each trainable's final
weights on that rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.models.weights import save_safetensors  # noqa: E402
from causvid.train.stage import Stage  # noqa: E402


class DummyDataset(Dataset):
    """``num_items`` fixed random vectors; item ``i`` is ``{"x": [4], "idx": i, "caption": str}``."""

    def __init__(self, num_items: int = 64, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_items, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "idx": i, "caption": f"item {i}"}


def parse_nan_spec(spec: str | None) -> dict:
    out = {}
    for part in (spec or "").split(","):
        if part.strip():
            step, name, kind = part.strip().split(":")
            out[(step if step == "*" else int(step), name)] = kind
    return out


class DummyStage(Stage):
    name = "dummy"

    def __init__(self, cfg=None, *, nan: dict | None = None, sleep: float | None = None, num_items: int = 64,
                 ratio: int = 2, out_dir: str | None = None, noise: float = 0.1,
                 global_rng: bool = True):
        super().__init__(cfg)
        self.noise_scale = noise
        self.global_rng = global_rng  # dropout + python/numpy random: exercises the saved RNG states
        self.nan = dict(nan) if nan is not None else parse_nan_spec(os.environ.get("DUMMY_NAN"))
        self.sleep = float(os.environ.get("DUMMY_SLEEP", "0")) if sleep is None else sleep
        self.num_items, self.ratio, self.out_dir = num_items, ratio, out_dir
        self.seen: list[tuple[int, str, list[int]]] = []
        self.setup_calls = 0

    @classmethod
    def check_config(cls, cfg) -> None:
        from causvid.config import ConfigError

        if cfg.train.batch_size > 8:
            raise ConfigError("invalid value for config key 'train.batch_size': the dummy stage takes at most 8")

    def setup(self, cfg, device) -> None:
        self.setup_calls += 1
        self.cfg = cfg
        self.generator = nn.Linear(4, 4)
        drop = nn.Dropout(0.2) if self.global_rng else nn.Identity()  # global torch RNG
        self.critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), drop, nn.Linear(8, 1))
        self.teacher = nn.Linear(4, 4)
        self.device = device
        if self.out_dir is not None:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(os.path.join(self.out_dir, f"world_{rank}.json"), "w") as f:
                json.dump({"world_size": world, "rank": rank, "pid": os.getpid()}, f)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def optim_config(self, name: str):
        return self.cfg.dmd.critic_optim if name == "critic" else self.cfg.train.optim

    def updates(self, step: int) -> list[str]:
        return ["generator", "critic"] if step % self.ratio == 0 else ["critic"]

    def dataset(self) -> Dataset:
        return DummyDataset(self.num_items)

    def loss(self, name, batch, models, step, rng):
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"]  # [B, 4]
        self.seen.append((step, name, [int(i) for i in batch["idx"]]))
        noise = torch.randn(x.shape, generator=rng, device=x.device)
        logs = {}
        if name == "generator":
            y = models["generator"](x + self.noise_scale * noise)
            with torch.no_grad():
                target = models["teacher"](x)
                score = models["critic"](y.detach())
            loss = F.mse_loss(y, target) + 0.01 * y.mean() * score.mean()
            logs["dmd_grad_norm"] = float((y - target).detach().norm())
            params = list(self.generator.parameters())
        else:
            with torch.no_grad():
                y = models["generator"](x + self.noise_scale * noise)
            target = x.sum(-1, keepdim=True)
            if self.global_rng:  # python and numpy global RNG
                target = target * (1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand()))
            loss = F.mse_loss(models["critic"](y), target)
            params = list(self.critic.parameters())
        kind = self.nan.get((step, name)) or self.nan.get(("*", name))
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":  # finite value (sqrt(0) = 0), NaN gradient (inf * 0)
            p = params[0]
            loss = loss + torch.sqrt((p - p.detach()).abs().sum())
        return loss, logs

    def ema_target(self):
        return "generator"

    def sample(self, models, step):
        w = torch.tanh(models["generator"].weight.detach())  # [4, 4]
        return {"generator weights": w[None, None].expand(5, 3, 4, 4)}  # a video [T, 3, H, W] in [-1, 1]

    def export(self, models, folder: str) -> None:
        for name in ("generator", "critic"):
            save_safetensors(models[name].state_dict(), os.path.join(folder, f"{name}.safetensors"))


def main(argv: list[str]) -> int:
    from causvid.config import load_config
    from causvid.train.trainer import run

    out_dir, overrides = argv[0], argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    cfg = load_config(None, [f"train.output_dir={out_dir}", *overrides])
    stage = DummyStage(cfg, out_dir=out_dir)
    summary = run(cfg, stage=stage)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    digest = {name: hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in m.parameters())).hexdigest()
              for name, m in stage.trainable().items()}  # equal on every rank iff DDP kept replicas in sync
    with open(os.path.join(out_dir, f"seen_{rank}.json"), "w") as f:
        json.dump({"seen": stage.seen, "summary": summary, "digest": digest}, f, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
