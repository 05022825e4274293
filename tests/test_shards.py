"""Latent shards: exact read-back, resumable after a kill (nothing lost or duplicated), disjoint ranks."""

import json
import os

import pytest
import torch

from causvid.data import shards as SH
from causvid.data.toyworld import ToyWorld
from causvid.models.text import ToyTextEncoder
from causvid.models.vae import WanVAE
from causvid.train.stages import VideoCaptionDataset

N_VIDEOS, SHARD = 5, 2  # -> 3 shards (2, 2, 1)


class CountingDataset(torch.utils.data.Dataset):
    """Counts reads of every item; optionally raises on the ``fail_at``-th read (a simulated kill)."""

    def __init__(self, base, fail_at=None):
        self.base, self.fail_at, self.reads = base, fail_at, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.fail_at is not None and len(self.reads) == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.reads.append(i)
        return self.base[i]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    world = VideoCaptionDataset(ToyWorld(height=16, width=16, num_frames=5, num_videos=N_VIDEOS, seed=3))
    vae = WanVAE("tiny").eval()
    enc = ToyTextEncoder(dim=24, text_len=8)
    return world, vae, enc


def _plan(n=N_VIDEOS):
    return SH.latent_plan(n, SHARD, {"text_len": 8, "text_dim": 24, "source": "test"})


def _encode(folder, parts, **kw):
    world, vae, enc = parts
    ds = kw.pop("dataset", None) or CountingDataset(world)
    written = SH.encode_latent_shards(folder, ds, vae, enc, _plan(), progress=False, batch_size=2, **kw)
    return written, ds


def test_round_trip_equals_direct_encoding(tmp_path, parts):
    world, vae, enc = parts
    written, _ = _encode(str(tmp_path), parts)
    assert written == [0, 1, 2]
    index = SH.finalize_index(str(tmp_path), _plan())
    assert [sh["ids"] for sh in index["shards"]] == [[0, 1], [2, 3], [4]]
    assert index["shards"][0]["shapes"]["latents"] == [2, 2, 4, 4, 4]
    on_disk = json.load(open(tmp_path / "index.json"))
    assert on_disk["num_samples"] == N_VIDEOS
    ds = SH.LatentShardDataset(str(tmp_path))
    assert len(ds) == N_VIDEOS
    for i in (0, 3, 4):
        item, ref = ds[i], world[i]
        with torch.no_grad():
            lat = vae.encode(ref["video"][None])[0]
        emb, lens = enc.encode([ref["caption"]])
        assert item["caption"] == ref["caption"]
        assert item["latents"].shape == (2, 4, 4, 4)
        assert torch.allclose(item["latents"], lat, atol=1e-5)
        assert item["context"].shape == (8, 24)
        assert torch.equal(item["context"], emb[0])  # padded back with exact zeros past the prompt
        assert int(lens[0]) < 8 or torch.count_nonzero(item["context"][int(lens[0]):]) == 0
    # default collate works on the items
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["latents"].shape == (2, 2, 4, 4, 4) and len(batch["caption"]) == 2


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, parts):
    world, _, _ = parts
    folder = str(tmp_path)
    # run 1: stopped after one shard (a time limit)
    written, ds1 = _encode(folder, parts, limit=1)
    assert written == [0] and SH.finalize_index(folder, _plan()) is None
    assert not os.path.exists(os.path.join(folder, "index.json"))
    # run 2: killed in the middle of shard 1 (after one of its items was read); leaves a stale tmp file
    open(os.path.join(folder, SH.shard_name(1) + ".tmp-12345"), "wb").write(b"partial")
    with pytest.raises(KeyboardInterrupt):
        _encode(folder, parts, dataset=CountingDataset(world, fail_at=1))
    # a corrupt (truncated) shard file counts as not done
    open(os.path.join(folder, SH.shard_name(2)), "wb").write(b"\x00garbage")
    assert SH.missing_shards(folder, _plan()) == [1, 2]
    # run 3: finishes; only the missing items are read, every item is read exactly once over runs 1 + 3
    written, ds3 = _encode(folder, parts)
    assert written == [1, 2]
    assert sorted(ds1.reads + ds3.reads) == list(range(N_VIDEOS))
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]
    index = SH.finalize_index(folder, _plan())
    ids = [i for sh in index["shards"] for i in sh["ids"]]
    assert ids == list(range(N_VIDEOS))
    # identical to an uninterrupted run
    clean = tmp_path / "clean"
    _encode(str(clean), parts)
    SH.finalize_index(str(clean), _plan())
    a, b = SH.LatentShardDataset(folder), SH.LatentShardDataset(str(clean))
    for i in range(N_VIDEOS):
        assert torch.equal(a[i]["latents"], b[i]["latents"]) and a[i]["caption"] == b[i]["caption"]
    # a finished folder: nothing left to do
    assert _encode(folder, parts)[0] == []


def test_two_ranks_write_disjoint_complete_shards(tmp_path, parts):
    folder = str(tmp_path)
    w0, d0 = _encode(folder, parts, rank=0, world=2)
    w1, d1 = _encode(folder, parts, rank=1, world=2)
    assert w0 == [0, 2] and w1 == [1]
    assert sorted(d0.reads + d1.reads) == list(range(N_VIDEOS))
    assert SH.finalize_index(folder, _plan()) is not None


def test_plan_mismatch_and_missing_index_are_clear_errors(tmp_path, parts):
    folder = str(tmp_path)
    _encode(folder, parts, limit=1)
    other = SH.latent_plan(N_VIDEOS, 3, {"text_len": 8, "text_dim": 24, "source": "test"})
    with pytest.raises(SH.ShardError, match="shard_size"):
        SH.prepare_folder(folder, other)
    with pytest.raises(SH.ShardError, match="index.json"):
        SH.LatentShardDataset(folder)
    with pytest.raises(ValueError, match="rank"):
        _plan().shards_for_rank(2, 2)
