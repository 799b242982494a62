"""Keras callbacks for models with Mixture-of-Experts layers."""

import os

import keras
import numpy as np

from keras_moe import compat
from keras_moe import statistics


def moe_layers(model):
    """Every layer of `model` (nested included) that reports routing."""
    return [
        layer for layer in compat.flatten_layers(model)
        if statistics.is_reporting(layer)
    ]


class RoutingStatistics(keras.callbacks.Callback):
    """Per-epoch routing statistics of every MoE layer in the model.

    At the end of each training epoch it reads each MoE layer's
    `routing_statistics()` (the routing of every training position of the
    epoch, summed over replicas), adds scalars to the epoch's `logs` (so
    they reach `History` and `CSVLogger`) named `<layer>/<statistic>`:
    `importance_cv2`, `load_cv2`, `max_mean_load`, `unused_experts`,
    `dropped_fraction`; keeps the per-expert shares in `self.history`; and,
    with `log_dir`, writes those scalars and the shares (as a histogram) to
    TensorBoard itself. Give it the `TensorBoard` callback's `log_dir` and
    the statistics appear beside Keras' own curves whatever the order of
    the callbacks (a `TensorBoard` callback writes the epoch's `logs` when
    its turn comes, so without `log_dir` only one listed after this one
    would see them). The statistics are reset at the start of every epoch.
    TensorBoard files are written with TensorFlow's summary writer (a
    dependency of the package) on any Keras backend.

    Args:
        log_dir: optional str. Folder for TensorBoard summaries (a
            `routing` subfolder is used). Defaults to None.

    Attributes:
        history: dict layer name -> list (one per epoch) of the dicts
            returned by `routing_statistics()`.
    """

    SCALARS = (
        "importance_cv2",
        "load_cv2",
        "max_mean_load",
        "unused_experts",
        "dropped_fraction",
    )

    def __init__(self, log_dir=None):
        super().__init__()
        self.log_dir = log_dir
        self.history = {}
        self._writer = None

    def on_epoch_begin(self, epoch, logs=None):
        for layer in moe_layers(self.model):
            layer.reset_routing_statistics()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        for layer in moe_layers(self.model):
            summary = layer.routing_statistics()
            self.history.setdefault(layer.name, []).append(summary)
            for name in self.SCALARS:
                logs[f"{layer.name}/{name}"] = float(summary[name])
            if self.log_dir:
                self._write_summaries(layer.name, summary, epoch)

    def _write_summaries(self, layer_name, statistics, epoch):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "routing")
            )
        shares = np.asarray(statistics["fraction_per_expert"], np.float32)
        with self._writer.as_default():
            # One sample per expert id, weighted by its share: the
            # histogram is the distribution of routed positions over ids.
            tf.summary.histogram(
                f"{layer_name}/expert_id_of_routed_positions",
                np.repeat(np.arange(len(shares)), np.maximum(
                    np.round(shares * 1000).astype(int), 0)),
                step=epoch,
            )
            for name in self.SCALARS:
                tf.summary.scalar(
                    f"{layer_name}/{name}", float(statistics[name]), step=epoch
                )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
