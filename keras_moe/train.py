"""Train the paper's LSTM-MoE language model on Penn Treebank.

`keras-moe-train` (or `python -m keras_moe.train`): trains with `model.fit`,
reports validation and test perplexity, and writes to `--out`:

- `tensorboard/`: Keras' TensorBoard logs, with the routing statistics;
- `perplexity.png`, `expert_load.png`: curves and per-expert load;
- `checkpoint.weights.h5`: the weights after the last epoch;
- `metrics.json`: perplexities, parameters, ops/timestep, wall time and the
  per-epoch history (routing statistics included);
- `saved_model/`: `model.export()` of a model whose `serve` signature maps
  int32 token ids `[batch, time]` to next-token probabilities
  `[batch, time, 10000]`.

With `--compare-baseline` it also trains the computationally matched dense
baseline (the MoE replaced by one feed-forward layer of hidden size
`experts_per_position * hidden_units`) into `--out/baseline` and prints both
side by side.
"""

import argparse
import json
import math
import os
import time

from keras_moe import validation

PRESETS = {
    # A few minutes on a 2-core CPU: a slice of PTB, a small model.
    "quick": dict(
        model_dim=128, experts=16, k=2, hidden_units=256, epochs=3,
        batch_size=32, seq_len=20, learning_rate=3e-3, dropout=0.1,
        max_tokens=200_000, schedule="constant",
    ),
    # The full corpus.
    "ptb": dict(
        model_dim=256, experts=16, k=2, hidden_units=512, epochs=10,
        batch_size=32, seq_len=35, learning_rate=2e-3, dropout=0.3,
        max_tokens=None, schedule="plateau",
    ),
}


def _checked(name, convert, check):
    """An argparse type: `convert` the text, then `check(name, value)` (a
    `keras_moe.validation` check, the one the layers use)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(
                f"`{name}` must be {kind}. Received: {name}={text}"
            ) from None
        try:
            return check(name, value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _count(name, minimum=1):
    return _checked(
        name, int, lambda name, value: validation.integer(name, value, minimum)
    )


def _positive(name):
    return _checked(
        name, float,
        lambda name, value: validation.number(name, value, 0.0, exclusive=True),
    )


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-moe-train",
        description="Train the LSTM-MoE language model on Penn Treebank.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--experts", type=_count("--experts", 0),
                        help="number of experts (0: dense baseline)")
    parser.add_argument("--k", type=_count("--k"),
                        help="experts per position (per level if hierarchical)")
    parser.add_argument("--hierarchical", type=_count("--hierarchical"), metavar="GROUPS",
                        help="hierarchical MoE with this many groups")
    parser.add_argument("--hidden-units", type=_count("--hidden-units"),
                        help="hidden size of each expert")
    parser.add_argument("--model-dim", type=_count("--model-dim"),
                        help="embedding/LSTM width")
    parser.add_argument("--epochs", type=_count("--epochs"))
    parser.add_argument("--batch-size", type=_count("--batch-size"))
    parser.add_argument("--seq-len", type=_count("--seq-len"),
                        help="truncated-BPTT window")
    parser.add_argument("--learning-rate", type=_positive("--learning-rate"))
    parser.add_argument("--dropout", type=_checked(
        "--dropout", float,
        lambda name, value: validation.number(name, value, 0.0, below=1.0),
    ))
    parser.add_argument("--max-tokens", type=_count("--max-tokens", 2),
                        help="use the first N tokens of each split")
    parser.add_argument("--capacity-factor", type=_positive("--capacity-factor"), default=None,
                        help="slots per expert relative to a balanced load "
                        "(default: dropless)")
    parser.add_argument(
        "--schedule", choices=["constant", "plateau"],
        help="plateau: halve the learning rate when validation perplexity "
        "stops improving and keep the best-validation weights",
    )
    parser.add_argument("--strategy", choices=["none", "mirrored"], default="none")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="also train the computationally matched dense baseline")
    parser.add_argument("--seed", type=_count("--seed", 0), default=0)
    parser.add_argument("--out", default="runs/lm")
    parser.add_argument("--verbose", default="auto",
                        choices=["auto", "0", "1", "2"],
                        help="Keras fit verbosity")
    return parser


def _check_combination(parser, args):
    """Usage errors for arguments that are only wrong together."""
    if args.experts == 0:
        if args.hierarchical:
            parser.error("--hierarchical needs --experts > 0")
        if args.compare_baseline:
            parser.error("--compare-baseline needs --experts > 0 (--experts 0 "
                         "trains the baseline alone)")
        return
    if args.hierarchical:
        if args.experts % args.hierarchical:
            parser.error(
                f"--experts {args.experts} must be a multiple of "
                f"--hierarchical {args.hierarchical}"
            )
        per_group = args.experts // args.hierarchical
        if args.k > min(args.hierarchical, per_group):
            parser.error(
                f"--k {args.k} exceeds the groups ({args.hierarchical}) or "
                f"the experts per group ({per_group}): k of each are chosen"
            )
    elif args.k > args.experts:
        parser.error(
            f"--k {args.k} exceeds --experts {args.experts}: a position "
            "cannot take more experts than there are"
        )
    if args.max_tokens is not None and (
        args.max_tokens < args.batch_size * args.seq_len + 1
    ):
        parser.error(
            f"--max-tokens {args.max_tokens} is too few for one batch of "
            f"--batch-size {args.batch_size} x --seq-len {args.seq_len} "
            f"(needs at least {args.batch_size * args.seq_len + 1})"
        )


def parse_args(argv=None):
    """Parses and checks the command line; exits with status 2 (usage) on
    a bad value, before anything heavy is imported."""
    parser = _parser()
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_combination(parser, args)
    if args.verbose != "auto":
        args.verbose = int(args.verbose)
    return args


def experts_per_position(args):
    return args.k * args.k if args.hierarchical else args.k


def _datasets(args):
    from keras_moe import data

    splits, vocabulary = data.load_ptb(max_tokens=args.max_tokens)
    datasets = {
        split: data.bptt_dataset(ids, args.batch_size, args.seq_len)
        for split, ids in splits.items()
    }
    return datasets, vocabulary


def _strategy(args):
    if args.strategy == "mirrored":
        from keras_moe import distribution

        return distribution.mirrored_strategy()
    return None


def build_and_compile(args, vocab_size, num_experts, strategy=None):
    import contextlib

    import keras

    from keras_moe import models

    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(args.seed)
        model = models.language_model(
            vocab_size,
            model_dim=args.model_dim,
            num_experts=num_experts,
            hidden_units=args.hidden_units,
            # The baseline's width matches the experts a position uses.
            k=args.k if num_experts else experts_per_position(args),
            hierarchical_groups=args.hierarchical if num_experts else None,
            dropout=args.dropout,
            capacity_factor=args.capacity_factor,
            seed=args.seed,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate, clipnorm=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[
                keras.metrics.SparseCategoricalCrossentropy(
                    from_logits=True, name="xent"
                )
            ],
        )
    return model


def _perplexity(cross_entropy):
    return float(math.exp(min(cross_entropy, 50.0)))


def train_one(args, datasets, vocab_size, num_experts, out_dir, strategy=None):
    """Trains, evaluates, exports one model; returns its metrics dict."""
    import keras

    from keras_moe import callbacks as moe_callbacks
    from keras_moe import models
    from keras_moe import plots

    os.makedirs(out_dir, exist_ok=True)
    model = build_and_compile(args, vocab_size, num_experts, strategy)
    routing = moe_callbacks.RoutingStatistics(
        log_dir=os.path.join(out_dir, "tensorboard")
    )
    callbacks = [
        routing,
        keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(out_dir, "checkpoint.weights.h5"),
            save_weights_only=True,
        ),
    ]
    if args.schedule == "plateau":
        callbacks += [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_xent", factor=0.5, patience=0, verbose=0
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_xent", patience=2, restore_best_weights=True
            ),
        ]
    start = time.perf_counter()
    history = model.fit(
        datasets["train"],
        validation_data=datasets["valid"],
        epochs=args.epochs,
        callbacks=callbacks,
        shuffle=False,  # BPTT windows continue each other
        verbose=args.verbose,
    )
    train_seconds = time.perf_counter() - start
    # The final weights are the last epoch's, or the best-validation epoch's
    # under the plateau schedule: report validation for those weights.
    test = model.evaluate(datasets["test"], verbose=0, return_dict=True)

    serving = models.probabilities_model(model)
    export_dir = os.path.join(out_dir, "saved_model")
    serving.export(export_dir, verbose=False)

    epochs = history.history
    metrics = {
        "model": model.name,
        "experts": num_experts,
        "hierarchical_groups": args.hierarchical if num_experts else None,
        "experts_per_position": experts_per_position(args),
        "parameters": int(model.count_params()),
        "ops_per_timestep": models.ops_per_timestep(model),
        "valid_perplexity": _perplexity(
            min(epochs["val_xent"]) if args.schedule == "plateau"
            else epochs["val_xent"][-1]
        ),
        "epochs_trained": len(epochs["val_xent"]),
        "test_perplexity": _perplexity(test["xent"]),
        "train_seconds": train_seconds,
        "epochs": {
            "train_perplexity": [_perplexity(x) for x in epochs["xent"]],
            "valid_perplexity": [_perplexity(x) for x in epochs["val_xent"]],
        },
        "routing": {
            layer: [
                {key: (value.tolist() if hasattr(value, "tolist") else value)
                 for key, value in statistics.items()}
                for statistics in per_epoch
            ]
            for layer, per_epoch in routing.history.items()
        },
        "saved_model": export_dir,
        "config": {key: value for key, value in vars(args).items()},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    plots.perplexity_curves({model.name: metrics}, os.path.join(out_dir, "perplexity.png"))
    if routing.history:
        plots.expert_load(routing.history, os.path.join(out_dir, "expert_load.png"))
    return metrics


def format_table(rows):
    header = (
        f"{'model':<14} {'experts':>8} {'params':>12} {'ops/timestep':>13} "
        f"{'valid ppl':>10} {'test ppl':>9} {'train s':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        experts = row["experts"] or "-"
        if row.get("hierarchical_groups"):
            experts = f"{row['experts']}-h"
        lines.append(
            f"{row['model']:<14} {experts!s:>8} {row['parameters']:>12,} "
            f"{row['ops_per_timestep']:>13,} {row['valid_perplexity']:>10.1f} "
            f"{row['test_perplexity']:>9.1f} {row['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def run(argv=None):
    """Parses `argv`, trains and reports; returns the metrics rows."""
    args = parse_args(argv)
    os.environ.setdefault("KERAS_MOE_QUIET", "1")
    from keras_moe import console

    console.import_backend()
    strategy = _strategy(args)
    datasets, vocabulary = _datasets(args)
    print(
        f"Penn Treebank: vocabulary {len(vocabulary):,}; preset {args.preset}; "
        f"writing to {args.out}"
    )
    rows = [train_one(args, datasets, len(vocabulary), args.experts, args.out, strategy)]
    if args.compare_baseline and args.experts:
        rows.append(
            train_one(args, datasets, len(vocabulary), 0,
                      os.path.join(args.out, "baseline"), strategy)
        )
        from keras_moe import plots

        plots.perplexity_curves(
            {row["model"]: row for row in rows},
            os.path.join(args.out, "comparison.png"),
        )
    print()
    print(format_table(rows))
    print()
    for row in rows:
        print(f"{row['model']}: SavedModel in {row['saved_model']}")
    print(f"Plots, metrics.json, checkpoints and TensorBoard logs in {args.out}")
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(
            [{key: row[key] for key in row if key not in ("config", "routing")}
             for row in rows],
            handle, indent=2,
        )
    return rows


def main(argv=None):
    """The `keras-moe-train` command: exit status 0 after a good run, 2
    for a usage error."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
