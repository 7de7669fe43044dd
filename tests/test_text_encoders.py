"""Text encoders: MiniLM offline, tiny UMT5 from a folder, the disk cache."""

import os
import warnings

import pytest
import torch

from selfforcing.text import CachedTextEncoder, MiniLMTextEncoder, UMT5TextEncoder, build_text_encoder
from selfforcing.text.encoders import minilm_path


@pytest.fixture(scope="module")
def minilm():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return MiniLMTextEncoder(text_len=24)


def test_minilm_states_padding_and_mask(minilm):
    e = minilm.encode(["the digit 3 moves right", "a"])
    assert e.states.shape == (2, 24, 384) and e.mask.shape == (2, 24)
    n0, n1 = int(e.mask[0].sum()), int(e.mask[1].sum())
    assert n0 > n1 >= 3  # [CLS] a [SEP]
    assert float(e.states[0, n0:].abs().max()) == 0.0 and float(e.states[1, n1:].abs().max()) == 0.0
    assert float(e.states[0, :n0].abs().min(-1).values.max()) >= 0 and float(e.states[0, :n0].abs().sum()) > 0


def test_minilm_paraphrase_is_closer_than_unrelated(minilm):
    v = minilm.pooled(["the digit 3 moves right", "the digit 3 moves to the right", "the digit 7 moves down",
                       "a red ball bouncing", "a crimson ball bounces", "stock market report"])
    sim = v @ v.T
    assert sim[3, 4] > sim[3, 5] + 0.3  # paraphrase vs unrelated
    assert sim[0, 1] > sim[0, 2] > sim[0, 5]  # same caption reworded > other digit and direction > unrelated


def test_batching_does_not_change_a_prompt(minilm):
    alone = minilm.encode(["the digit 5 moves up and to the left"]).states[0]
    batch = minilm.encode(["x", "the digit 5 moves up and to the left", "a much longer prompt with many words"]).states[1]
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=1e-5)


def test_tiny_umt5_from_a_local_folder(tmp_path):
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    folder = tmp_path / "umt5"
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    enc = build_text_encoder(str(folder), text_len=16)
    assert isinstance(enc, UMT5TextEncoder) and enc.dim == 32
    e = enc.encode(["a cat", "the digit 3 moves right"])
    assert e.states.shape == (2, 16, 32)
    assert float(e.states[0, int(e.mask[0].sum()):].abs().max()) == 0.0
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UMT5TextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("t5-xxl-from-the-internet")


def test_cache_is_exact_skips_the_encoder_and_survives_corruption(minilm, tmp_path):
    cached = CachedTextEncoder(minilm, str(tmp_path / "cache"))
    prompts = ["the digit 1 moves left", "", "the digit 1 moves left", "the digit 2 moves up"]
    first = cached.encode(prompts)
    assert cached.encoded_prompts == 3  # duplicates encoded once; "" (the unconditional prompt) works
    fresh = minilm.encode(prompts)
    torch.testing.assert_close(first.states, fresh.states)
    assert torch.equal(first.mask, fresh.mask)
    again = CachedTextEncoder(minilm, str(tmp_path / "cache"))  # a new process: from disk only
    second = again.encode(prompts)
    assert again.encoded_prompts == 0 and torch.equal(second.states, first.states)
    # corrupt one entry: warned, re-encoded, rewritten
    victim = again._path("the digit 2 moves up")
    with open(victim, "wb") as fh:
        fh.write(b"garbage")
    third = CachedTextEncoder(minilm, str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="unreadable"):
        out = third.encode(["the digit 2 moves up"])
    assert third.encoded_prompts == 1
    torch.testing.assert_close(out.states[0], first.states[3])
    # keys differ per encoder identity / text length
    other = CachedTextEncoder(MiniLMTextEncoder(text_len=8), str(tmp_path / "cache"))
    assert other._path("x") != cached._path("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CachedTextEncoder(minilm, str(tmp_path / "cache")).encode(["the digit 2 moves up"])
