"""The run's plot: training loss vs step, and the held-out score per level vs step."""
from __future__ import annotations

import os

import torch

__all__ = ["save_plot"]

METRIC_LABELS = {"psnr": "PSNR (dB)", "level_error": "mean |level error|"}


def save_plot(history: dict, path: str | os.PathLike) -> None:
    """Two panels: training loss vs step, and the held-out score per level vs step
    (the adapter's first metric; dotted: the degraded input's own score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = history["config"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4.2))

    steps, losses = history["train"]["step"], history["train"]["loss"]
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.8,
                     label=f"mean of {window}")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend()

    metric = history["metric"]
    label = METRIC_LABELS.get(metric, metric)
    eval_steps = [e["step"] for e in history["eval"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(history["eval"][0][metric] if history["eval"] else []):
        color = colors[i % len(colors)]
        ax_eval.plot(eval_steps, [e[metric][key] for e in history["eval"]], "o-", color=color,
                     label=f"{history['level_name']} {key}")
        if history["input"] is not None:
            ax_eval.axhline(history["input"][metric][key], color=color, ls=":", lw=1)
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel(label)
    ax_eval.set_title(f"held-out {label} per level" + (" (dotted: degraded input)"
                                                        if history["input"] is not None else ""))
    ax_eval.grid(alpha=0.3)
    if history["eval"]:
        ax_eval.legend(fontsize=8)

    fig.suptitle(f"{cfg['model']} on {cfg['task'] or 'paired data'}: {cfg['steps']} steps, "
                 f"batch {cfg['batch']}, crop {cfg['crop']}, lr {cfg['lr']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
