"""Reporting an evaluation: the plots (a PNG per metric and length), the contact sheets of each method's first
sample, ``results.json`` and the Markdown report ``report.md``, all from the results dict of :mod:`.runner`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..fileio import atomic_write, atomic_write_text
from ..io.video import contact_sheet

_CURVE_LABELS = {"fd": "Frechet distance (digit features) vs real", "adherence": "prompt adherence",
                 "flip_rate": "temporal flip rate", "brightness_drift": "|brightness - real|",
                 "contrast_drift": "|contrast - real|", "saturation_drift": "|saturation - real|"}


def write_plots(results: dict, out_dir: str) -> list[str]:
    """One PNG per (metric, length): the metric per window against the pixel frame index, a line per method
    (solid: own rollout, dashed: GT KV cache), shaded 95% intervals. matplotlib (Agg). Returns the PNGs' paths
    relative to ``out_dir``."""
    import matplotlib  # here, not at the top: pyplot must come after use("Agg"), and only a run that plots pays it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = []
    curves = results["curves"]
    methods = list(dict.fromkeys(c["method"] for c in curves))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for length in dict.fromkeys(c["length"] for c in curves):
        for metric in dict.fromkeys(c["metric"] for c in curves):
            sel = [c for c in curves if c["length"] == length and c["metric"] == metric]
            if not sel:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
            _draw(ax, sel, colours, metric, length)
            fig.tight_layout()
            rel = os.path.join("plots", f"{metric}_x{length}.png")
            path = os.path.join(out_dir, rel)

            def write(tmp, fig=fig):
                fig.savefig(tmp, format="png")

            atomic_write(path, write)
            plt.close(fig)
            paths.append(rel)
    return paths


def _draw(ax, sel: list[dict], colours: dict, metric: str, length: int) -> None:
    """The curves ``sel`` of one metric and length on ``ax``: a line per method and context, shaded intervals."""
    for c in sel:
        x = c["frames"]
        style = "-" if c["context"] == "self" else "--"
        label = c["method"] + ("" if c["context"] == "self" else " (GT cache)")
        ax.plot(x, c["mean"], style, marker="o", ms=3, color=colours[c["method"]], label=label)
        ax.fill_between(x, c["ci_lo"], c["ci_hi"], color=colours[c["method"]], alpha=0.12, lw=0)
    ax.set_xlabel("pixel frame (window centre)")
    ax.set_ylabel(_CURVE_LABELS.get(metric, metric))
    ax.set_title(f"{_CURVE_LABELS.get(metric, metric)}, length x{length}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def write_previews(previews: dict, out_dir: str) -> list[str]:
    """A contact sheet (PNG) of the first sample of each method and length; ``previews``: {(method, length):
    uint8 gray frames [F, H, W]}. Returns the sheets' paths relative to ``out_dir``."""
    paths = []
    for (name, length), frames in previews.items():
        video = frames.float()[:, None].expand(-1, 3, -1, -1) / 127.5 - 1
        sheet = contact_sheet(video, columns=12)
        rel = os.path.join("samples", f"{name}_x{length}.png")

        def write(tmp, sheet=sheet):
            sheet.save(tmp, format="PNG")

        atomic_write(os.path.join(out_dir, rel), write)
        paths.append(rel)
    return paths


def _fmt(row: dict | None) -> str:
    """A row's value as "mean ± half the interval" ("-": undefined)."""
    if row is None or row["mean"] is None:
        return "-"
    v = row["mean"]
    digits = 3 if abs(v) < 10 else 1
    if row["ci"] is None:
        return f"{v:.{digits}f}"
    half = (row["ci"][1] - row["ci"][0]) / 2
    return f"{v:.{digits}f} ± {half:.{digits}f}"


_TABLE = [("fd", "FD ↓"), ("fd_slope", "FD slope /frame ↓"), ("adherence_first", "adherence (1st window) ↑"),
          ("adherence", "adherence ↑"), ("flip_rate", "flip rate ↓"), ("contrast_drift", "contrast drift ↓"),
          ("brightness_drift", "brightness drift ↓"), ("drift_slope", "pixel drift slope ↓")]
_GAP = [("fd", "FD"), ("adherence", "adherence"), ("flip_rate", "flip rate"), ("contrast_drift", "contrast drift")]


def _gap_lines(rows: dict, methods: list[str], lengths: list[int]) -> list[str]:
    """The train-test gap table (own rollout / GT cache / gap per method and length); none without GT-cache runs."""
    gap_methods = [m for m in methods if any((m, L, "fd_gap") in rows for L in lengths)]
    if not gap_methods:
        return []
    lines = ["## Train-test gap: GT KV cache vs Self Forcing KV cache", "",
             "The same causal model with its KV cache holding ground-truth frames (the real clip of the prompt, "
             "teacher-forced context) versus its own rollout, same noise and prompts. gap = own rollout - GT "
             "cache (paired over samples): the exposure bias of each method.", "",
             "| method | length | " + " | ".join(f"{h} own / GT / gap" for _, h in _GAP) + " |",
             "|---|---" + "|---" * len(_GAP) + "|"]
    for m in gap_methods:
        for length in lengths:
            if (m, length, "fd_gap") not in rows:
                continue
            cells = [f"{_fmt(rows.get((m, length, k)))} / {_fmt(rows.get((m, length, k + '_gt_cache')))} / "
                     f"{_fmt(rows.get((m, length, k + '_gap')))}" for k, _ in _GAP]
            lines.append(f"| {m} | x{length} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_report(results: dict) -> str:
    """The Markdown report: settings, a table per length, the GT-cache vs own-rollout table, plots, notes."""
    st = results["settings"]
    rows = {(r["method"], r["length"], r["metric"]): r for r in results["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    lengths = list(dict.fromkeys(r["length"] for r in results["rows"]))
    lines = ["# Evaluation report", "",
             f"{st['num_samples']} samples per method and length "
             f"(seeds {st['seed']}..{st['seed'] + st['num_samples'] - 1}), "
             f"training length {st['train_frames']} pixel frames, metric window {st['window']} frames, "
             f"{st['num_real']} real test clips as reference, rolling KV window {st['kv_window']} latent frames "
             f"({st['sink_frames']} sinks). Values: mean ± half the 95% bootstrap interval over samples. "
             f"`real` = held-out real clips scored the same way (what a perfect generator gets).", ""]
    lines += ["| method | sampler | shift | checkpoint |", "|---|---|---|---|"]
    for m in results["methods"]:
        lines.append(f"| {m['name']} | {m['sampler']} | {m['shift']} | `{m['checkpoint']}` |")
    lines.append("")
    for length in lengths:
        lines += [f"## Length x{length}", "", "| method | " + " | ".join(h for _, h in _TABLE) + " |",
                  "|---" * (len(_TABLE) + 1) + "|"]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(rows.get((m, length, k))) for k, _ in _TABLE) + " |")
        lines.append("")
    lines += _gap_lines(rows, methods, lengths)
    if results.get("plots"):
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    if results.get("previews"):
        lines += ["## First sample of each method", ""] + [f"![{p}]({p})" for p in results["previews"]] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines.append(f"Computed in {results['seconds']} s (cached samples are not regenerated).")
    return "\n".join(lines) + "\n"


def json_default(o):
    """JSON for what ``json.dumps`` does not take in results and cache keys: numpy scalars, tuples (as lists)."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def write_report(results: dict, previews: dict, out_dir: str) -> None:
    """Write the plots and previews (their relative paths land in ``results["plots"]`` / ``["previews"]``), then
    ``results.json`` and ``report.md`` under ``out_dir``. ``previews``: {(method, length): uint8 [F, H, W]}."""
    results["plots"] = write_plots(results, out_dir)
    results["previews"] = write_previews(previews, out_dir)
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=json_default))
    atomic_write_text(os.path.join(out_dir, "report.md"), render_report(results))
