"""An on-disk, content-addressed cache of prompt embeddings in front of any :class:`TextEncoder`.

Each prompt's real-token states (float32 [n, D], ``n <= text_len``) live in one safetensors file,
``cache_dir/<sha256(identity, text_len, prompt)>.safetensors``, written atomically (temp file +
``os.replace``), with the prompt, the encoder identity and a sha256 of the tensor bytes in its metadata.
A file that fails to load or to verify is reported with a warning, re-encoded and overwritten: the cache
never crashes a run and never hands back states it cannot vouch for. Recently used entries also stay in an
in-memory LRU, so a training loop over a fixed caption set touches the disk once per caption.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import torch

from ..fileio import atomic_write
from ..lru import LRUCache
from .encoders import TextEmbedding, TextEncoder, _check_prompts

_FORMAT = "selfforcing-text-embedding-v1"


def _tensor_digest(states: torch.Tensor) -> str:
    return hashlib.sha256(states.contiguous().numpy().tobytes()).hexdigest()


class CachedTextEncoder(TextEncoder):
    """``encoder`` with a disk + memory cache; same interface (``encode``, ``dim``, ``text_len``, ``identity``,
    ``to``), same outputs: states [B, text_len, dim] float32, exact zeros past each prompt, mask [B, text_len].

    Only prompts found neither in memory nor on disk go through ``encoder.encode`` (deduplicated, in
    chunks of ``encode_batch_size``). Counters: ``encoded_prompts`` (prompts the encoder ran on),
    ``memory_hits``, ``disk_hits``."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | os.PathLike, memory_items: int = 4096,
                 encode_batch_size: int = 64) -> None:
        if isinstance(encoder, CachedTextEncoder):
            raise TypeError("encoder is already a CachedTextEncoder; wrap the underlying encoder once")
        if memory_items < 0 or encode_batch_size < 1:
            raise ValueError(f"need memory_items >= 0 and encode_batch_size >= 1, "
                             f"got {memory_items} and {encode_batch_size}")
        self.encoder = encoder
        self.cache_dir = os.fspath(cache_dir)
        self.dim, self.text_len, self.identity = encoder.dim, encoder.text_len, encoder.identity
        self.device = encoder.device
        self.memory_items, self.encode_batch_size = memory_items, encode_batch_size
        os.makedirs(self.cache_dir, exist_ok=True)
        self._memory: LRUCache[str, torch.Tensor] = LRUCache(memory_items)
        self.encoded_prompts = self.memory_hits = self.disk_hits = 0

    def to(self, device: str | torch.device) -> CachedTextEncoder:
        self.encoder.to(device)
        self.device = torch.device(device)
        return self

    # ------------------------------------------------------------------------------------------ entries
    def key(self, prompt: str) -> str:
        """sha256 hex of (encoder identity, text_len, prompt): the entry's file name."""
        payload = "\0".join([self.identity, str(self.text_len), prompt])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def entry_path(self, prompt: str) -> str:
        """Where ``prompt``'s states are stored."""
        return os.path.join(self.cache_dir, self.key(prompt) + ".safetensors")

    def _read(self, prompt: str) -> torch.Tensor | None:
        """The stored states [n, dim] of ``prompt``, or None when absent or unusable (with a warning)."""
        from safetensors import safe_open

        path = self.entry_path(prompt)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                states = fh.get_tensor("states")
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r} is not {_FORMAT!r}")
            if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                raise ValueError("stored for another prompt or encoder")
            if states.dtype != torch.float32 or states.ndim != 2 or states.shape[1] != self.dim \
                    or states.shape[0] > self.text_len:
                raise ValueError(f"states {states.dtype} {tuple(states.shape)} do not fit "
                                 f"float32 [<= {self.text_len}, {self.dim}]")
            if meta.get("sha256") != _tensor_digest(states):
                raise ValueError("checksum mismatch")
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the remedy is to re-encode
            warnings.warn(f"text-embedding cache entry {path} for prompt {prompt!r:.80} is unusable "
                          f"({type(err).__name__}: {err}); re-encoding and overwriting it", stacklevel=3)
            return None
        return states

    def _write(self, prompt: str, states: torch.Tensor) -> None:
        from safetensors.torch import save_file

        meta = {"format": _FORMAT, "prompt": prompt, "identity": self.identity, "text_len": str(self.text_len),
                "sha256": _tensor_digest(states)}
        try:
            atomic_write(self.entry_path(prompt), lambda tmp: save_file({"states": states}, tmp, metadata=meta))
        except OSError as err:  # a full or read-only disk costs speed, not the run
            warnings.warn(f"could not write text-embedding cache entry {self.entry_path(prompt)}: {err}",
                          stacklevel=3)

    def _lookup(self, prompt: str) -> torch.Tensor | None:
        states = self._memory.get(prompt)
        if states is not None:
            self.memory_hits += 1
            return states
        states = self._read(prompt)
        if states is not None:
            self.disk_hits += 1
            self._memory.put(prompt, states)
        return states

    # ------------------------------------------------------------------------------------------- encode
    def _encode_missing(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for start in range(0, len(prompts), self.encode_batch_size):
            chunk = prompts[start:start + self.encode_batch_size]
            emb = self.encoder.encode(chunk)
            if tuple(emb.states.shape) != (len(chunk), self.text_len, self.dim):
                raise ValueError(f"{self.identity} returned states {tuple(emb.states.shape)}, "
                                 f"expected {(len(chunk), self.text_len, self.dim)}")
            self.encoded_prompts += len(chunk)
            states, mask = emb.states.detach().float().cpu(), emb.mask.cpu()
            for prompt, s, m in zip(chunk, states, mask):
                n = int(m.sum())
                if not bool(m[:n].all()):  # trimming to n rows is only right when real tokens come first
                    raise ValueError(f"{self.identity} returned a mask whose real tokens are not a prefix "
                                     f"(left padding?) for prompt {prompt!r:.60}; the cache needs right padding")
                real = s[:n].clone()
                self._write(prompt, real)
                self._memory.put(prompt, real)
                out[prompt] = real
        return out

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Cached states [B, text_len, dim] (zeros past each prompt) and mask [B, text_len] on ``device``;
        the encoder runs once on the prompts missing from the cache."""
        prompts = _check_prompts(prompts)
        found: dict[str, torch.Tensor] = {}
        missing = []
        for prompt in dict.fromkeys(prompts):  # unique, in order
            states = self._lookup(prompt)
            if states is None:
                missing.append(prompt)
            else:
                found[prompt] = states
        found.update(self._encode_missing(missing))
        states = torch.zeros(len(prompts), self.text_len, self.dim)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            n = found[prompt].shape[0]
            states[i, :n] = found[prompt]
            mask[i, :n] = True
        return TextEmbedding(states, mask).to(self.device)
