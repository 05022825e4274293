"""Text encoders (causvid.models.text): umT5 layout, numerics, tokenizer, weights, cache, toy encoder."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from causvid.config import TextConfig
from causvid.models.text import (
    TOY_TEXT_KIND,
    ToyTextEncoder,
    UMT5Encoder,
    UMT5TextEncoder,
    relative_position_bucket,
    text_encoder_from_config,
    umt5_arch,
    umt5_key_from_hf,
    umt5_key_to_hf,
    umt5_state_dict_to_hf,
)
from causvid.models.weights import WeightsError, read_model_header, save_safetensors

SENTENCES = [
    "a red circle moving left on a plain background",
    "the blue square jumps over the green fence",
    "a small yellow triangle rotates slowly on a textured background",
    "two purple stars drift to the right while a white cross stays still",
    "Ein roter Kreis bewegt sich nach links.",
]
TOY_WORDS = ["a", "an", "red", "green", "blue", "yellow", "circle", "square", "triangle", "moving", "left",
             "right", "up", "down", "and", "on", "plain", "textured", "background", "top-left"]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A real BPE tokenizer (SentencePiece-style metaspace) trained on the fly, saved as tokenizer.json
    with umT5's special ids (pad 0, eos 1, unk 2). Seen words become single tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(SENTENCES * 4, trainer)
    folder = tmp_path_factory.mktemp("umt5-tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def tiny_model(seed=0, arch="tiny"):
    """Tiny umT5 with every tensor random (norm weights too, so a skipped multiply would show)."""
    m = UMT5Encoder(arch).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture
def tiny_encoder(tok_dir):
    return UMT5TextEncoder(tiny_model(), UMT5TextEncoder.random(tok_dir, "tiny", text_len=24).tokenizer)


# ------------------------------------------------------------------------------------------------
# umT5 layout and naming
# ------------------------------------------------------------------------------------------------


def test_umt5_xxl_state_dict_equals_reference(reference_tsv):
    with torch.device("meta"):
        m = UMT5Encoder("umt5-xxl")
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    expected = list(reference_tsv("umt5_xxl_encoder.tsv").items())
    assert len(expected) == 242
    assert got == expected  # names, shapes and order
    assert sum(p.numel() for p in m.parameters()) == 5_680_910_336  # §5.1


def test_hf_mapping_is_a_bijection():
    with torch.device("meta"):
        keys = list(UMT5Encoder("umt5-xxl").state_dict())
    hf = [umt5_key_to_hf(k) for k in keys]
    assert len(set(hf)) == len(keys)
    assert [umt5_key_from_hf(h) for h in hf] == keys
    assert umt5_key_from_hf("encoder.embed_tokens.weight") == "token_embedding.weight"  # HF's tied copy
    # The HF names of a 2-layer encoder, written out from §7.3.
    with torch.device("meta"):
        two = UMT5Encoder(umt5_arch("tiny").replace(num_layers=2))
    expected = {"shared.weight", "encoder.final_layer_norm.weight"}
    for n in range(2):
        b = f"encoder.block.{n}.layer"
        expected |= {f"{b}.0.layer_norm.weight", f"{b}.0.SelfAttention.relative_attention_bias.weight",
                     f"{b}.1.layer_norm.weight", f"{b}.1.DenseReluDense.wi_0.weight",
                     f"{b}.1.DenseReluDense.wi_1.weight", f"{b}.1.DenseReluDense.wo.weight"}
        expected |= {f"{b}.0.SelfAttention.{p}.weight" for p in "qkvo"}
    assert set(umt5_state_dict_to_hf(two.state_dict())) == expected
    assert umt5_key_to_hf("blocks.3.ffn.gate.0.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_0.weight"
    assert umt5_key_to_hf("blocks.3.ffn.fc1.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_1.weight"
    with pytest.raises(WeightsError, match="decoder.block.0.layer.0.SelfAttention.q.weight"):
        umt5_key_from_hf("decoder.block.0.layer.0.SelfAttention.q.weight")
    with pytest.raises(WeightsError, match="blocks.0.attn.bogus"):
        umt5_key_to_hf("blocks.0.attn.bogus.weight")


def test_relative_bucket_test_vector():
    rel = [-1000, -200, -128, -127, -64, -32, -16, -12, -9, -8, -7, -1, 0, 1, 2, 7, 8, 9, 12, 16, 32, 64, 127, 128,
           200, 1000]
    expected = [15, 15, 15, 15, 14, 12, 10, 9, 8, 8, 7, 1, 0, 17, 18, 23, 24, 24, 25, 26, 28, 30, 31, 31, 31, 31]
    assert relative_position_bucket(torch.tensor(rel)).tolist() == expected


# ------------------------------------------------------------------------------------------------
# umT5 numerics: an independent float64 re-computation of §5.1
# ------------------------------------------------------------------------------------------------


def _ref_bucket(rel: int) -> int:
    b = 16 if rel > 0 else 0
    a = abs(rel)
    return b + (a if a < 8 else min(8 + int(math.log(a / 8) / math.log(128 / 8) * 8), 15))


def _ref_umt5(sd, arch, ids, mask):
    """Spec §5.1 written out with loops over samples and heads, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    d = arch.head_dim

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    L = ids.shape[1]
    bucket = torch.tensor([[_ref_bucket(j - i) for j in range(L)] for i in range(L)])  # [query, key]
    outs = []
    for b in range(ids.shape[0]):
        x = sd["token_embedding.weight"][ids[b]]  # [L, D]
        for n in range(arch.num_layers):
            p = lambda s: sd[f"blocks.{n}.{s}"]  # noqa: B023
            h = rms(x, p("norm1.weight"))
            q, k, v = (h @ p(f"attn.{w}.weight").T for w in "qkv")
            heads = []
            for hd in range(arch.num_heads):
                s = slice(hd * d, (hd + 1) * d)
                logits = q[:, s] @ k[:, s].T + p("pos_embedding.embedding.weight")[bucket, hd]  # no 1/sqrt(d)
                logits[:, mask[b] == 0] = -math.inf
                heads.append(torch.softmax(logits, -1) @ v[:, s])
            x = x + torch.cat(heads, -1) @ p("attn.o.weight").T
            h = rms(x, p("norm2.weight"))
            x = x + ((h @ p("ffn.fc1.weight").T) * gelu_tanh(h @ p("ffn.gate.0.weight").T)) @ p("ffn.fc2.weight").T
        outs.append(rms(x, sd["norm.weight"]))
    return torch.stack(outs)


def test_umt5_forward_matches_float64_reference():
    arch = umt5_arch("tiny").replace(num_layers=2)
    m = tiny_model(arch=arch)
    L = 40  # long enough for logarithmic buckets (|rel| up to 39)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, arch.vocab_size, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 23:] = 0
    ref = _ref_umt5(m.state_dict(), arch, ids, mask)
    with torch.no_grad():
        out32 = m(ids, mask)
        out64 = m.double()(ids, mask)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (out64 - ref).abs().max() < 1e-10 * ref.abs().max()
    # The key mask matters: sample 1's real rows differ from an unmasked run.
    with torch.no_grad():
        unmasked = m(ids, torch.ones_like(mask))
    assert (unmasked[1, :23].double() - out64[1, :23]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# tokenizer, padding, zero rows, cache
# ------------------------------------------------------------------------------------------------


def test_tokenizer_folder_pads_and_appends_eos(tok_dir):
    enc = UMT5TextEncoder.random(tok_dir, "tiny", text_len=12)
    tok = enc.tokenizer
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids, mask = tok(["a red circle", "  a   red\n circle &amp; ", "a red circle " * 20, ""])
    assert ids.shape == mask.shape == (4, 12)
    n = int(mask[0].sum())
    plain = tok.tokenizer.encode("a red circle", add_special_tokens=False).ids
    assert ids[0, :n].tolist() == plain + [1]
    assert ids[0, n:].eq(0).all() and mask[0, n:].eq(0).all() and mask[0, :n].eq(1).all()
    # whitespace cleaning + html unescape: "a red circle &" tokenises like the clean text
    assert ids[1, : int(mask[1].sum())].tolist() == tok.tokenizer.encode("a red circle &", add_special_tokens=False).ids + [1]
    # truncation keeps room for eos
    assert mask[2].sum() == 12 and ids[2, -1] == 1
    assert ids[3].tolist() == [1] + [0] * 11 and mask[3].sum() == 1


def test_encode_zero_rows_and_padding_invariance(tok_dir):
    m = tiny_model()
    short = UMT5TextEncoder(m, UMT5TextEncoder.random(tok_dir, "tiny", text_len=16).tokenizer)
    long_ = UMT5TextEncoder(m, UMT5TextEncoder.random(tok_dir, "tiny", text_len=48).tokenizer)
    prompts = ["a red circle moving left", "the blue square"]
    emb, lens = short.encode(prompts)
    assert emb.shape == (2, 16, 24) and emb.dtype == torch.float32
    _, mask = short.tokenizer(prompts)
    assert lens.tolist() == mask.sum(1).tolist()
    for b in range(2):
        assert emb[b, lens[b]:].eq(0).all()
        assert emb[b, : lens[b]].abs().sum(-1).gt(0).all()
    # The real rows equal a full-length run of the model on all padded positions (keys masked) ...
    ids, mask = short.tokenizer(prompts)
    with torch.no_grad():
        full = m(ids, mask)
    for b in range(2):
        torch.testing.assert_close(emb[b, : lens[b]], full[b, : lens[b]], rtol=1e-5, atol=1e-6)
    # ... and do not depend on how far the prompt is padded.
    emb48, lens48 = long_.encode(prompts)
    assert emb48.shape == (2, 48, 24) and lens48.tolist() == lens.tolist()
    torch.testing.assert_close(emb48[:, :16], emb, rtol=1e-5, atol=1e-6)
    assert emb48[:, 16:].eq(0).all()


def test_embedding_cache(tiny_encoder):
    calls = []
    tiny_encoder.model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    neg = "blurry, static, low quality"
    e1, l1 = tiny_encoder.encode(["a red circle", neg, "a red circle"])
    assert calls == [1, 1]  # two distinct prompts, each encoded alone (batch-independent results)
    assert (tiny_encoder.cache_misses, tiny_encoder.cache_hits) == (2, 1)
    assert torch.equal(e1[0], e1[2])
    e2, l2 = tiny_encoder.encode([neg])
    assert calls == [1, 1] and tiny_encoder.cache_hits == 2  # served from the cache
    assert torch.equal(e2[0], e1[1]) and l2[0] == l1[1]
    e2[0, 0, 0] = 123.0  # the caller's tensor is a copy: the cache is unharmed
    assert torch.equal(tiny_encoder.encode([neg])[0][0], e1[1])
    tiny_encoder.clear_cache()
    assert tiny_encoder.num_cached == 0
    e3, _ = tiny_encoder.encode([neg])
    assert calls == [1, 1, 1] and torch.equal(e3[0], e1[1])
    with pytest.raises(TypeError):
        tiny_encoder.encode("a single string")


def test_release_moves_weights_to_cpu(tiny_encoder):
    before, _ = tiny_encoder.encode(["a red circle"])
    assert tiny_encoder.release() is tiny_encoder
    assert all(p.device.type == "cpu" for p in tiny_encoder.parameters())
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    tiny_encoder.clear_cache()
    after, _ = tiny_encoder.encode(["a red circle"])
    assert torch.equal(before, after)
    assert (tiny_encoder.dim, tiny_encoder.text_len) == (24, 24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_and_release(tiny_encoder):
    ref, lens = tiny_encoder.encode(["a red circle moving left"])
    tiny_encoder.clear_cache()
    tiny_encoder.to("cuda")
    emb, lens_c = tiny_encoder.encode(["a red circle moving left"])
    assert emb.device.type == "cuda" and lens_c.device.type == "cuda"
    torch.testing.assert_close(emb.cpu(), ref, rtol=1e-4, atol=1e-5)
    assert emb[0, lens[0]:].eq(0).all()
    held = torch.cuda.memory_allocated()
    tiny_encoder.release()
    assert all(p.device.type == "cpu" for p in tiny_encoder.parameters())
    assert torch.cuda.memory_allocated() < held
    assert tiny_encoder.encode(["a red circle moving left"], device="cuda")[0].device.type == "cuda"  # cache


# ------------------------------------------------------------------------------------------------
# weight files
# ------------------------------------------------------------------------------------------------


def test_pth_round_trip_through_safe_loader(tmp_path, tok_dir, tiny_encoder):
    sd = tiny_encoder.model.state_dict()
    path = str(tmp_path / "models_t5_umt5-tiny-enc.pth")
    torch.save(sd, path)
    loaded = UMT5TextEncoder.from_files(path, tok_dir, "tiny", dtype=torch.float32, text_len=24)
    assert loaded.model.state_dict().keys() == sd.keys()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in sd.items())
    prompts = ["a red circle", "two purple stars"]
    assert torch.equal(loaded.encode(prompts)[0], tiny_encoder.encode(prompts)[0])
    # bf16 file, as the official one, kept bf16 and output as float32
    torch.save({k: v.bfloat16() for k, v in sd.items()}, path)
    bf = UMT5TextEncoder.from_files(path, tok_dir, "tiny", dtype=torch.bfloat16, text_len=24)
    assert bf.model.token_embedding.weight.dtype == torch.bfloat16
    assert torch.equal(bf.model.blocks[1].ffn.fc2.weight, sd["blocks.1.ffn.fc2.weight"].bfloat16())
    emb, lens = bf.encode(prompts)
    assert emb.dtype == torch.float32 and emb[0, lens[0]:].eq(0).all()


def test_hf_named_weights_load(tmp_path, tok_dir, tiny_encoder):
    hf = {k: v.clone() for k, v in umt5_state_dict_to_hf(tiny_encoder.model.state_dict()).items()}
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"].clone()  # HF's tied copy may be present
    path = str(tmp_path / "model.safetensors")
    save_safetensors(hf, path)
    loaded = UMT5TextEncoder.from_files(str(tmp_path), tok_dir, "tiny", dtype=torch.float32, text_len=24)
    assert torch.equal(loaded.encode(["a red circle"])[0], tiny_encoder.encode(["a red circle"])[0])


def test_strict_loading_names_the_tensor(tmp_path, tok_dir, tiny_encoder):
    sd = dict(tiny_encoder.model.state_dict())
    sd.pop("blocks.1.attn.k.weight")
    sd["blocks.0.norm2.weight"] = torch.ones(7)
    path = str(tmp_path / "broken.pth")
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        UMT5TextEncoder.from_files(path, tok_dir, "tiny")
    assert "blocks.1.attn.k.weight" in str(err.value) and "blocks.0.norm2.weight" in str(err.value)
    assert path in str(err.value)


def test_missing_files_name_the_path(tmp_path, tok_dir, tiny_encoder):
    weights = str(tmp_path / "w.pth")
    torch.save(tiny_encoder.model.state_dict(), weights)
    missing_tok = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        UMT5TextEncoder.from_files(weights, missing_tok, "tiny")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=os.path.join("empty-folder", "tokenizer.json")):
        UMT5TextEncoder.from_files(weights, str(empty), "tiny")
    missing_w = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(WeightsError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        UMT5TextEncoder.from_files(missing_w, tok_dir, "tiny")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # would create a folder if the pickle were ever run


def test_pickle_with_code_is_refused(tmp_path, tok_dir, tiny_encoder):
    marker = str(tmp_path / "code-ran")
    sd = dict(tiny_encoder.model.state_dict())
    path = str(tmp_path / "evil.pth")
    torch.save({**sd, "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        UMT5TextEncoder.from_files(path, tok_dir, "tiny")
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------------------------------
# the toy encoder
# ------------------------------------------------------------------------------------------------


def test_toy_encoder_is_deterministic():
    a, b, c = ToyTextEncoder(TOY_WORDS, seed=0), ToyTextEncoder(TOY_WORDS, seed=0), ToyTextEncoder(TOY_WORDS, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["token_embedding.weight"], sc["token_embedding.weight"])
    prompts = ["a red circle moving left"]
    assert torch.equal(a.encode(prompts)[0], b.encode(prompts)[0])
    assert (a.dim, a.text_len) == (64, 16)


def test_toy_encoder_distinguishes_captions():
    enc = ToyTextEncoder(TOY_WORDS)
    base = "a red circle moving left"
    variants = {1: "a blue circle moving left", 2: "a red square moving left", 4: "a red circle moving right"}
    emb, lens = enc.encode([base, *variants.values()])
    assert lens.tolist() == [6, 6, 6, 6]  # five words + eos
    for i, (pos, _) in enumerate(variants.items(), start=1):
        cos = F.cosine_similarity(emb[0, pos], emb[i, pos], dim=0)
        assert cos < 0.99, (variants[pos], float(cos))
        assert emb[i, lens[i]:].eq(0).all()
    # the word-level tokenizer lowercases, drops punctuation but hyphens, maps unknown words to <unk> (2)
    ids, _ = enc.tokenizer(["A  RED Circle.", "a red circle", "a purple top-left, circle"])
    assert torch.equal(ids[0], ids[1])
    words = ["a", "<unk>", "top-left", "circle"]
    assert ids[2, :4].tolist() == [enc.tokenizer.tokenizer.token_to_id(w) for w in words] and ids[2, 1] == 2
    assert ids[2, 4] == 1 and ids[2, 5:].eq(0).all()


def test_toy_encoder_save_load(tmp_path):
    enc = ToyTextEncoder(TOY_WORDS, dim=32, text_len=8, num_heads=2, seed=3)
    path = str(tmp_path / "toy_text.safetensors")
    enc.save(path)
    kind, config = read_model_header(path)
    assert kind == TOY_TEXT_KIND and config["dim"] == 32 and config["text_len"] == 8 and config["seed"] == 3
    assert config["vocabulary"] == enc.vocabulary
    back = ToyTextEncoder.load(path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())
    prompts = ["a green triangle moving up", "blue square"]
    assert torch.equal(back.encode(prompts)[0], enc.encode(prompts)[0])
    # from the run config: path given -> that file; expectations of the DiT are checked
    from_cfg = text_encoder_from_config(TextConfig(kind="toy", path=path), dim=32, text_len=8)
    assert torch.equal(from_cfg.encode(prompts)[0], enc.encode(prompts)[0])
    with pytest.raises(ValueError, match="text_dim 64"):
        text_encoder_from_config(TextConfig(kind="toy", path=path), dim=64)


def test_toy_default_vocabulary_from_toyworld():
    toyworld = pytest.importorskip("causvid.data.toyworld")
    if not hasattr(toyworld, "VOCABULARY") or not hasattr(toyworld, "toyworld_prompts"):
        pytest.skip("causvid.data.toyworld has no VOCABULARY / toyworld_prompts yet")
    enc = text_encoder_from_config(TextConfig(kind="toy"))
    assert (enc.dim, enc.text_len) == (64, 16)
    captions = toyworld.toyworld_prompts(64, seed=5)
    ids, mask = enc.tokenizer(captions)
    assert not ids.eq(2).any()  # every word of every caption is known ("up-left" is one word)
    assert (ids * mask).eq(1).sum(1).eq(1).all()  # eos present: nothing truncated away
    emb, lens = enc.encode(captions)
    assert lens.tolist() == [len(c.split()) + 1 for c in captions]
    unique = list(dict.fromkeys(captions))
    flat = enc.encode(unique)[0].flatten(1)  # [N, text_len * dim]
    assert torch.cdist(flat, flat).add(torch.eye(len(unique)) * 1e9).min() > 1.0  # distinct captions, distinct embeddings


# ------------------------------------------------------------------------------------------------
# from the run config
# ------------------------------------------------------------------------------------------------


def test_text_encoder_from_config_umt5_kinds(tmp_path, tok_dir):
    enc = text_encoder_from_config(TextConfig(kind="tiny-umt5", tokenizer_path=tok_dir), dim=24, text_len=8)
    assert isinstance(enc, UMT5TextEncoder) and (enc.dim, enc.text_len) == (24, 8)
    emb, lens = enc.encode(["a red circle moving left on a plain background"])
    assert emb.shape == (1, 8, 24) and lens.tolist() == [8]
    with pytest.raises(ValueError, match="text.path"):
        text_encoder_from_config(TextConfig(kind="umt5", tokenizer_path=tok_dir))
    with pytest.raises(ValueError, match="text.tokenizer_path"):
        text_encoder_from_config(TextConfig(kind="umt5", path="x.pth"))
    missing = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(WeightsError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        text_encoder_from_config(TextConfig(kind="umt5", path=missing, tokenizer_path=tok_dir))


def test_token_ids_outside_the_vocabulary_are_refused(tok_dir):
    small = UMT5Encoder(umt5_arch("tiny").replace(vocab_size=8)).init_weights(0)
    enc = UMT5TextEncoder(small, UMT5TextEncoder.random(tok_dir, "tiny").tokenizer)
    with pytest.raises(ValueError, match="outside the umT5 vocabulary of 8"):
        enc.encode(["a red circle moving left"])


def test_transformers_umt5_encoder_folder_loads_and_matches(tmp_path, tok_dir):
    """A folder written by transformers' own ``UMT5EncoderModel.save_pretrained`` (the `interop` extra brings
    transformers) loads through the strict HF name map and encodes like transformers does."""
    transformers = pytest.importorskip("transformers")
    a = umt5_arch("tiny")
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=a.vocab_size, d_model=a.dim, d_kv=a.dim_attn // a.num_heads,
                                     d_ff=a.dim_ffn, num_heads=a.num_heads, num_layers=a.num_layers,
                                     relative_attention_num_buckets=a.num_buckets,
                                     relative_attention_max_distance=a.max_distance, layer_norm_epsilon=a.eps,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    theirs = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1, so a skipped multiply shows
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = UMT5TextEncoder.from_files(str(tmp_path / "hf"), tok_dir, "tiny", dtype=torch.float32, text_len=8)
    ids = torch.tensor([[5, 9, 31, 7, 1, 0, 0, 0], [12, 3, 44, 8, 16, 2, 1, 0]])
    mask = (torch.arange(8) < torch.tensor([[5], [7]])).long()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_encode_goes_through_forward_hooks_so_a_fsdp2_sharded_encoder_works(tmp_path):
    """The trainer shards frozen networks with ``blocks`` under FSDP2 (the toy encoder has them); FSDP2 gathers the
    weights in forward hooks, so ``encode`` must call the module, not ``.forward`` (it failed under FSDP2 with
    'aten.embedding got mixed torch.Tensor and DTensor'). A one-process gloo group is enough to shard."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    enc = ToyTextEncoder(seed=0)
    want, _ = enc.encode(["a red circle moving left"])
    enc.clear_cache()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for blk in enc.blocks:
            fully_shard(blk)
        fully_shard(enc)
        got, _ = enc.encode(["a red circle moving left"])
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, want)
