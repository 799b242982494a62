"""A one-minute demonstration: `python -m keras_moe.demo` (`make demo`).

A synthetic task in which experts can specialise: each sequence's first
token picks one of several hidden "topics", and the target at every later
position is the current token mapped through that topic's permutation. An
`Embedding -> LSTM -> MixtureOfExperts -> softmax` model is trained with
`model.fit` next to its computationally matched dense baseline (one
feed-forward layer of hidden size `k * hidden_units`, the paper's
"MoE-1-Wide"), and the script prints accuracy, parameters, multiply-adds
per position and how the MoE spread its positions over the experts.
"""

import argparse
import time

import numpy as np

import keras_moe

VOCAB = 64
TOPICS = 8


def make_data(num_sequences, length, seed):
    rng = np.random.default_rng(seed)
    permutations = np.stack(
        [np.random.default_rng(100 + t).permutation(VOCAB) for t in range(TOPICS)]
    )
    tokens = rng.integers(1, VOCAB, size=(num_sequences, length)).astype("int32")
    topics = tokens[:, 0] % TOPICS
    targets = permutations[topics[:, None], tokens].astype("int32")
    targets[:, 0] = 0
    return tokens, targets


def build_model(kind, num_experts, hidden_units, k, width=64, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, width)(inputs)
    x = keras.layers.LSTM(width, return_sequences=True)(x)
    if kind == "moe":
        x = keras_moe.MixtureOfExperts(
            num_experts, hidden_units, k=k, seed=seed, name="moe"
        )(x)
    else:
        x = keras.layers.Dense(k * hidden_units, activation="relu")(x)
        x = keras.layers.Dense(width)(x)
    outputs = keras.layers.Dense(VOCAB)(x)
    model = keras.Model(inputs, outputs, name=kind)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--hidden-units", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)

    from keras import ops

    train = make_data(4096, 12, seed=0)
    test = make_data(512, 12, seed=1)
    width = 64
    rows = []
    for kind in ("dense", "moe"):
        model = build_model(kind, args.experts, args.hidden_units, args.k, width)
        print(f"\nTraining the {kind} model")
        start = time.perf_counter()
        model.fit(*train, batch_size=64, epochs=args.epochs, verbose=2)
        seconds = time.perf_counter() - start
        loss, accuracy = model.evaluate(*test, verbose=0)
        # Multiply-adds per position of the feed-forward part: k experts of
        # d -> h -> d (plus the gate) vs one d -> k*h -> d layer.
        ffn = 2 * width * args.k * args.hidden_units
        gate = 2 * width * args.experts if kind == "moe" else 0
        rows.append((kind, model.count_params(), ffn + gate, loss, accuracy, seconds))
        if kind == "moe":
            moe = model.get_layer("moe")
            hidden = model.get_layer(index=2)(model.get_layer(index=1)(test[0]))
            _, indices = moe.gating(hidden)
            load = np.bincount(
                ops.convert_to_numpy(indices).ravel(), minlength=args.experts
            )
            share = load / load.sum()

    print("\nmodel   params   FFN mult-adds/position   test loss   test acc   train s")
    for kind, params, madds, loss, accuracy, seconds in rows:
        print(
            f"{kind:<7} {params:>7,}   {madds:>22,}   {loss:>9.3f}   "
            f"{accuracy:>8.3f}   {seconds:>7.1f}"
        )
    print(
        f"\nShare of test positions per expert (k={args.k} of "
        f"{args.experts}, ideal {1 / args.experts:.3f}):"
    )
    print("  " + " ".join(f"{s:.3f}" for s in share))
    print(f"  max/mean load: {share.max() * args.experts:.2f}")


if __name__ == "__main__":
    main()
