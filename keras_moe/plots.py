"""Matplotlib figures for training runs (written as PNG, no display)."""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_curves(runs, path):
    """Train/validation perplexity per epoch for one or more runs.

    Args:
        runs: dict name -> metrics dict with `epochs.train_perplexity` and
            `epochs.valid_perplexity` lists.
        path: PNG file to write.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, metrics in runs.items():
        epochs = metrics["epochs"]
        steps = np.arange(1, len(epochs["valid_perplexity"]) + 1)
        line = axis.plot(steps, epochs["valid_perplexity"], marker="o", label=f"{name} valid")
        axis.plot(steps, epochs["train_perplexity"], linestyle="--",
                  color=line[0].get_color(), label=f"{name} train")
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.set_title("Penn Treebank perplexity")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def expert_load(routing_history, path):
    """Share of routed positions per expert, last epoch, one panel a layer.

    Args:
        routing_history: dict layer name -> list of `routing_statistics()`
            dicts (`RoutingStatistics.history`).
        path: PNG file to write.
    """
    plt = _pyplot()
    names = list(routing_history)
    figure, axes = plt.subplots(len(names), 1, figsize=(7, 3 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        statistics = routing_history[name][-1]
        shares = np.asarray(statistics["fraction_per_expert"])
        axis.bar(np.arange(len(shares)), shares, width=0.9)
        axis.axhline(1.0 / len(shares), color="black", linestyle=":", label="balanced")
        axis.set_xlabel("expert")
        axis.set_ylabel("share of positions")
        axis.set_title(
            f"{name}: max/mean {statistics['max_mean_load']:.2f}, "
            f"CV^2(load) {statistics['load_cv2']:.3f}, "
            f"unused {statistics['unused_experts']}"
        )
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
