"""Sharded safetensors data sets: VAE latents (+ text embeddings) and ODE-trajectory pairs (``docs/method.md`` §6).

On disk, one folder::

    plan.json                 what is being written (item count, shard size, settings); checked on resume
    shard-00000.safetensors   items [0, shard_size), self-describing (ids and captions in its header)
    shard-00001.safetensors   ...
    index.json                written last, once every shard exists: shard -> sample ids, shapes, size
                              and sha256 (readers verify each shard against it before its first read)

Writing is resumable and parallel: shard ``s`` holds items ``[s * shard_size, (s + 1) * shard_size)``, rank ``r``
of ``w`` processes writes the shards ``s`` with ``s % w == r``, every shard is written atomically (temporary
file, fsync, rename) and a shard whose file exists with the planned ids in its header is done and skipped.
A killed run re-run therefore writes every item exactly once. ``index.json`` is the completion marker the
readers require.

Tensors of one shard (``n`` items):

* latents shards: ``latents [n, F, C, h, w]``, ``context [n, Lmax, D]``, ``context_lens [n]``
* ODE-pair shards: ``states [n, K, F, C, h, w]`` (K stored levels, the last one the clean x0), ``context``,
  ``context_lens``

``context`` keeps only the real rows of each prompt (``Lmax`` = the longest prompt of the shard); readers pad
back to ``text_len`` with zeros (the text encoders' convention, ``causvid.models.text.TextEncoder``).
Header metadata (strings): ``kind``, ``ids`` (json list), ``captions`` (json list), and for ODE pairs ``seeds``.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open

from causvid.models.weights import file_sha256, save_safetensors

PLAN_NAME = "plan.json"
INDEX_NAME = "index.json"
LATENTS_KIND = "latents"
ODE_KIND = "ode_pairs"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard folder is missing, incomplete, corrupt, or was planned with different settings."""


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ShardError(f"cannot read {path}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# The plan: which items go into which shard, and who writes it
# ----------------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    """``num_items`` items cut into shards of ``shard_size``; ``settings`` must match on resume."""

    kind: str
    num_items: int
    shard_size: int
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_items < 1 or self.shard_size < 1:
            raise ValueError(f"shard plan needs num_items >= 1 and shard_size >= 1, got {self.num_items}, "
                             f"{self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_items(self, s: int) -> list[int]:
        return list(range(s * self.shard_size, min((s + 1) * self.shard_size, self.num_items)))

    def shards_for_rank(self, rank: int, world: int) -> list[int]:
        """Round-robin: rank ``r`` of ``w`` writes shards ``r, r + w, r + 2w, ...``."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        return list(range(rank, self.num_shards, world))

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "num_items": self.num_items,
                "shard_size": self.shard_size, "settings": self.settings}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def prepare_folder(folder: str, plan: ShardPlan) -> None:
    """Create ``folder`` and write ``plan.json``, or check that an existing plan is the same (resume).

    Raises :class:`ShardError` naming the differing fields when a previous run planned something else.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PLAN_NAME)
    want = _jsonable(plan.to_dict())
    if os.path.isfile(path):
        have = _read_json(path)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            detail = {k: (have.get(k), want.get(k)) for k in diff if k != "settings"}
            if "settings" in diff:
                hs, ws = have.get("settings", {}), want.get("settings", {})
                detail.update({f"settings.{k}": (hs.get(k), ws.get(k))
                               for k in sorted(set(hs) | set(ws)) if hs.get(k) != ws.get(k)})
            raise ShardError(f"{folder} was started with a different plan (existing vs new: {detail}); "
                             "use another output folder or delete it to start over")
        return
    _atomic_json(path, want)


def read_shard_header(path: str) -> Optional[dict]:
    """The decoded header metadata of a shard, or None when the file is missing or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception:  # a truncated / corrupt file counts as not written
        return None
    out: dict[str, Any] = {"tensors": keys}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def shard_done(folder: str, plan: ShardPlan, s: int) -> bool:
    """A shard is done when its file exists, reads, has the plan's kind and exactly the planned ids."""
    head = read_shard_header(os.path.join(folder, shard_name(s)))
    return head is not None and head.get("kind") == plan.kind and head.get("ids") == plan.shard_items(s)


def clean_stale_tmp(folder: str, shards: Sequence[int]) -> None:
    """Remove temporary files left by a killed writer of ``shards`` (only those: other ranks may be writing)."""
    for s in shards:
        for tmp in glob.glob(os.path.join(folder, shard_name(s) + ".tmp-*")):
            try:
                os.remove(tmp)
            except OSError:
                pass


def write_shard(folder: str, plan: ShardPlan, s: int, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Atomically write shard ``s`` (``meta`` values are json-encoded into the header)."""
    ids = plan.shard_items(s)
    for k, v in tensors.items():
        if v.shape[0] != len(ids):
            raise ShardError(f"shard {s}: tensor {k!r} has {v.shape[0]} rows, the plan has {len(ids)} items")
    header = {"kind": plan.kind, "ids": json.dumps(ids)}
    header.update({k: json.dumps(v, ensure_ascii=False) for k, v in meta.items()})
    path = os.path.join(folder, shard_name(s))
    save_safetensors(tensors, path, header)
    return path


def pack_context(emb: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, text_len, D] zero-padded embeddings -> ([n, Lmax, D], lens [n]) keeping only the real rows."""
    lmax = max(int(lens.max()), 1) if lens.numel() else 1
    return emb[:, :lmax].float().contiguous(), lens.long().cpu()


def finalize_index(folder: str, plan: ShardPlan, extra: Optional[dict] = None) -> Optional[dict]:
    """Write ``index.json`` if every planned shard is done; return it, or None (listing nothing) if not.

    The index maps every shard file to its sample ids and tensor shapes.
    """
    missing = [s for s in range(plan.num_shards) if not shard_done(folder, plan, s)]
    if missing:
        return None
    shards = []
    for s in range(plan.num_shards):
        path = os.path.join(folder, shard_name(s))
        with safe_open(path, framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        shards.append({"file": shard_name(s), "ids": plan.shard_items(s), "shapes": shapes,
                       "size": os.path.getsize(path), "sha256": file_sha256(path)})
    index = {**plan.to_dict(), **(extra or {}), "num_samples": plan.num_items, "shards": shards}
    _atomic_json(os.path.join(folder, INDEX_NAME), _jsonable(index))
    return index


def missing_shards(folder: str, plan: ShardPlan) -> list[int]:
    return [s for s in range(plan.num_shards) if not shard_done(folder, plan, s)]


# ----------------------------------------------------------------------------------------------------
# Encoding videos into latent shards
# ----------------------------------------------------------------------------------------------------


def latent_plan(num_items: int, shard_size: int, settings: dict) -> ShardPlan:
    return ShardPlan(LATENTS_KIND, num_items, shard_size, settings)


@torch.no_grad()
def encode_latent_shards(folder: str, dataset, vae, text_encoder, plan: ShardPlan, *, rank: int = 0,
                         world: int = 1, batch_size: int = 4, dtype: torch.dtype = torch.float32,
                         limit: Optional[int] = None, progress: bool = True,
                         device: torch.device | str = "cpu") -> list[int]:
    """Encode the items of ``dataset`` (``{"video": [T, 3, H, W] in [-1, 1], "caption": str}``) into the latent
    shards of ``plan`` that rank ``rank`` of ``world`` owns and that are not done yet.

    ``limit``: write at most this many shards in this call (time-boxed jobs, tests). Returns the shards
    written. Call :func:`finalize_index` (on one process, after all have finished) to write ``index.json``.
    """
    prepare_folder(folder, plan)
    mine = plan.shards_for_rank(rank, world)
    todo = [s for s in mine if not shard_done(folder, plan, s)]
    clean_stale_tmp(folder, todo)
    if limit is not None:
        todo = todo[:limit]
    bar = _progress(sum(len(plan.shard_items(s)) for s in todo), f"encode latents (rank {rank})", progress)
    written = []
    for s in todo:
        ids = plan.shard_items(s)
        lat, embs, lens, caps = [], [], [], []
        for i in range(0, len(ids), batch_size):
            items = [dataset[j] for j in ids[i: i + batch_size]]
            video = torch.stack([it["video"] for it in items]).to(device)  # [b, T, 3, H, W]
            lat.append(vae.encode(video.to(next(vae.parameters()).dtype)).float().cpu())  # [b, F, C, h, w]
            cap = [str(it["caption"]) for it in items]
            e, n = text_encoder.encode(cap)
            embs.append(e.float().cpu())
            lens.append(n.cpu())
            caps += cap
            bar.update(len(items))
        ctx, ctx_lens = pack_context(torch.cat(embs), torch.cat(lens))
        write_shard(folder, plan, s, {"latents": torch.cat(lat).to(dtype), "context": ctx.to(dtype),
                                      "context_lens": ctx_lens}, {"captions": caps})
        written.append(s)
    bar.close()
    return written


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _resolve_index(path: str) -> tuple[str, str]:
    """A folder or its index.json -> (folder, index path)."""
    if os.path.isdir(path):
        folder, index = path, os.path.join(path, INDEX_NAME)
    else:
        folder, index = os.path.dirname(os.path.abspath(path)), path
    if not os.path.isfile(index):
        raise ShardError(f"no {INDEX_NAME} in {folder}: the shards were never finished (re-run the script that "
                         "writes them; it resumes) or this is not a shard folder")
    return folder, index


class _ShardDataset(torch.utils.data.Dataset):
    """Map-style reader over the shards listed in ``index.json``; reads one row per item (memory-mapped)."""

    kind = ""
    main_tensor = ""

    def __init__(self, path: str):
        self.folder, index_path = _resolve_index(path)
        self.index = _read_json(index_path)
        if self.index.get("kind") != self.kind:
            raise ShardError(f"{index_path} holds {self.index.get('kind')!r} shards, expected {self.kind!r}")
        self.shards = self.index["shards"]
        self.text_len = int(self.index["settings"]["text_len"])
        self._starts = []
        n = 0
        for sh in self.shards:
            self._starts.append(n)
            n += len(sh["ids"])
            if not os.path.isfile(os.path.join(self.folder, sh["file"])):
                raise ShardError(f"{index_path} lists {sh['file']}, which is missing from {self.folder}")
        self._len = n
        self._captions: dict[int, list[str]] = {}
        self._verified: set[int] = set()

    def verify_shard(self, s: int) -> None:
        """Check shard ``s`` against the size and sha256 in ``index.json`` (once per process); ShardError if not.

        An index written before checksums existed has none: its shards are read unverified."""
        if s in self._verified:
            return
        sh = self.shards[s]
        path = os.path.join(self.folder, sh["file"])
        if "sha256" in sh and (os.path.getsize(path) != sh.get("size") or file_sha256(path) != sh["sha256"]):
            raise ShardError(f"shard {path} does not match its checksum in {INDEX_NAME} (corrupt); rewrite it: "
                             f"delete it and {INDEX_NAME}, then re-run the script that wrote the folder")
        self._verified.add(s)

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range [0, {self._len}) of {self.folder}")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def _read(self, i: int, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], str, dict]:
        s, row = self._locate(i)
        self.verify_shard(s)
        path = os.path.join(self.folder, self.shards[s]["file"])
        try:
            with safe_open(path, framework="pt") as f:
                out = {k: f.get_slice(k)[row: row + 1][0] for k in names}
                meta = f.metadata() or {}
        except Exception as err:
            raise ShardError(f"cannot read row {row} of {path}: {err}") from None
        caps = json.loads(meta.get("captions", "[]"))
        return out, caps[row] if row < len(caps) else "", meta

    def _context(self, ctx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Stored real rows [Lmax, D] -> [text_len, D] float32, zero past the prompt."""
        out = torch.zeros(self.text_len, ctx.shape[-1], dtype=torch.float32)
        k = int(n)
        out[:k] = ctx[:k].float()
        return out


class LatentShardDataset(_ShardDataset):
    """Items ``{"latents": [F, C, h, w] float32, "context": [text_len, D] float32, "caption": str}``."""

    kind = LATENTS_KIND

    def __getitem__(self, i: int) -> dict:
        t, cap, _ = self._read(i, ("latents", "context", "context_lens"))
        return {"latents": t["latents"].float(), "context": self._context(t["context"], t["context_lens"]),
                "caption": cap}


class ODEPairDataset(_ShardDataset):
    """Items ``{"states": [K, F, C, h, w], "timesteps": [K], "context": [text_len, D], "caption": str}``.

    ``states[k]`` is the teacher's ODE state at the k-th level of the student's step list (``timesteps[k]``,
    the configured values, e.g. [1000, 757, 522, 0]); ``states[-1]`` is the final clean sample (t = 0).
    ``self.settings`` holds the generation settings (grid timesteps actually stored, step indices, ...).
    """

    kind = ODE_KIND

    def __init__(self, path: str):
        super().__init__(path)
        self.step_list = [float(x) for x in self.settings["step_list"]]
        self._timesteps = torch.tensor(self.step_list, dtype=torch.float32)

    def __getitem__(self, i: int) -> dict:
        t, cap, _ = self._read(i, ("states", "context", "context_lens"))
        return {"states": t["states"].float(), "timesteps": self._timesteps.clone(),
                "context": self._context(t["context"], t["context_lens"]), "caption": cap}
