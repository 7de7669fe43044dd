"""A small CNN digit classifier on the real MNIST digits of Moving-Digits, used by :mod:`selfforcing.eval.metrics`.

Architecture (input x: float [N, 1, 28, 28] in [-1, 1], white strokes on black = -1):

    conv3x3(1->16) -> ReLU -> maxpool2   [N, 16, 14, 14]
    conv3x3(16->32) -> ReLU -> maxpool2  [N, 32, 7, 7]
    flatten -> linear(1568->64) -> ReLU  [N, 64]   <- ``features`` (the Frechet-distance embedding)
    linear(64->10)                        [N, 10]   <- logits

~106k parameters. It is trained only on the TRAIN-split images (``split_indices("train")``: per class the
first 80% of the 5,000 shipped MNIST digits) with random +-2 px shifts, and its accuracy is measured on the
disjoint TEST-split images. Weights ship in ``selfforcing/assets/eval/digit_classifier.safetensors`` with a
json next to them recording the test accuracy, training steps and seconds.

Retrain with ``python -m selfforcing.eval.digit_classifier``.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfforcing.data.moving_digits import DIGIT_SIZE, load_mnist_digits, split_indices
from selfforcing.fileio import atomic_write

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "eval")
WEIGHTS_PATH = os.path.join(ASSETS_DIR, "digit_classifier.safetensors")
INFO_PATH = os.path.join(ASSETS_DIR, "digit_classifier.json")
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """CNN on float [N, 1, 28, 28] in [-1, 1]; ``features`` -> [N, 64], ``forward`` -> logits [N, 10]."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, feature_dim)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (post-ReLU) float [N, 64] of images float [N, 1, 28, 28] in [-1, 1]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"digit classifier expects images [N, 1, 28, 28], got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits float [N, 10]."""
        return self.fc2(self.features(x))


def digit_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST images of ``split`` as float [N, 1, 28, 28] in [-1, 1] (x / 127.5 - 1) and labels int64 [N]."""
    images, labels = load_mnist_digits()
    idx = np.sort(np.concatenate(list(split_indices(split).values())))
    x = torch.from_numpy(images[idx]).float().div_(127.5).sub_(1.0)[:, None]
    return x, torch.from_numpy(labels[idx]).long()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of [N, 1, H, W] by an integer (dx, dy) uniform in [-max_shift, max_shift]^2, filling
    with background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = off[:, 1, None] + torch.arange(h)  # [N, H]
    cols = off[:, 0, None] + torch.arange(w)  # [N, W]
    bidx = torch.arange(n)[:, None, None]
    return padded[bidx, 0, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on images [N, 1, 28, 28] with labels [N]."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / len(x)


def train_digit_classifier(
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    threads: int = 2,
    out_path: str | None = WEIGHTS_PATH,
    log_every: int = 250,
) -> tuple[DigitClassifier, dict]:
    """Train on the TRAIN-split digits (AdamW, cosine lr, cross-entropy, +-``max_shift`` px random shifts),
    evaluate on the TEST-split digits, and (if ``out_path``) save the weights atomically with a json beside
    them. Returns (model in eval mode, info dict with test_accuracy, train_accuracy, steps, seconds, params)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = digit_tensors("train")
    x_te, y_te = digit_tensors("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        xb = random_shift(x_tr[idx], max_shift, gen)
        loss = F.cross_entropy(model(xb), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    info = {
        "test_accuracy": accuracy(model, x_te, y_te),
        "train_accuracy": accuracy(model, x_tr, y_tr),
        "num_test": len(x_te),
        "num_train": len(x_tr),
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 2),
        "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "max_shift": max_shift,
        "seed": seed,
    }
    if out_path is not None:
        save_classifier(model, info, out_path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


def save_classifier(model: DigitClassifier, info: dict, out_path: str) -> None:
    """Write the weights to ``out_path`` (safetensors) and ``info`` beside them (.json), each atomically and
    readable by everyone."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def write_weights(tmp: str) -> None:
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped assets must be readable by everyone

    def write_info(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o644)

    atomic_write(out_path, write_weights)
    atomic_write(os.path.splitext(out_path)[0] + ".json", write_info)


@functools.lru_cache(maxsize=2)
def load_digit_classifier(path: str = WEIGHTS_PATH) -> DigitClassifier:
    """The shipped classifier, frozen (requires_grad False) and in eval mode (cached per path; do not mutate)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digit classifier weights missing: {path} "
                                "(train them with: python -m selfforcing.eval.digit_classifier)")
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


if __name__ == "__main__":
    _, _info = train_digit_classifier()
    print(json.dumps(_info, indent=2))
