"""German-to-English translation at small scale (PAPER.md section 6's setting).

The data are the sentence pairs of the Ding dictionary shipped by Debian's
`trans-de-en` package (`/usr/share/trans/de-en`; `apt-get install
trans-de-en`): lines `german :: english`, with `|` separating aligned
sub-entries. Pairs where both sides are full sentences are kept
(`sentence_pair_filter`, which also counts what it rejects and why).

- `load_sentence_pairs`: the pairs, deterministically shuffled.
- `train_sentencepiece`: a SentencePiece model trained offline (bytes).
- `translation_model`: an LSTM encoder-decoder with attention and an MoE
  layer between the encoder's and between the decoder's LSTM layers (or
  none, the baseline).
- `Translator`: a `tf.Module` that maps raw German strings to English
  strings (tokenised with `tensorflow_text.SentencepieceTokenizer` inside
  the graph, greedy decoding), exportable with `tf.saved_model.save`.
- `corpus_bleu`: corpus BLEU by `sacrebleu`.

TensorFlow, tensorflow-text, sentencepiece and sacrebleu (the
`[notebooks]` extra).
"""

import collections
import io
import os
import random
import re

import keras

DEFAULT_PATH = "/usr/share/trans/de-en"
PAD, UNK, BOS, EOS = 0, 1, 2, 3

# Usage labels (`[ugs.]`, `[Am.]`, `{f}`): annotations, not text.
_LABEL = re.compile(r"\s*(\[[^\]]*\]|\{[^}]*\})")
# Why a sub-entry pair is not used, by kind (see `sentence_pair_filter`).
REJECTED = {
    "misaligned": "the two sides have different numbers of `|` sub-entries, "
                  "so which German goes with which English is unknown",
    "phrase": "a dictionary phrase, not a sentence: no capital first letter "
              "or no final `.`, `!` or `?` (e.g. `etw. mit einer Abgabe "
              "belegen`), on either side",
    "alternatives": "`/` offers alternative words inside the sentence "
                    "(`comes/arrives`, `gut / schlecht`); choosing one would "
                    "mean guessing how far each alternative reaches",
    "markup": "other dictionary markup (`<`, `>`, `~`) that is not text",
    "duplicate": "the same pair already appeared",
}


def _clean(text):
    """One side of a sub-entry as a sentence: labels dropped, first of the
    `;`-separated variants (the dictionary's main translation)."""
    text = _LABEL.sub("", text).split(";")[0]
    return re.sub(r"\s+([.!?,])", r"\1", re.sub(r"\s+", " ", text)).strip()


def _rejection(text):
    """Why `text` (cleaned) is not a usable sentence, or None."""
    if not text or not text[0].isupper() or text[-1] not in ".!?":
        return "phrase"
    if "/" in text:
        return "alternatives"
    if re.search(r"[<>~\[\]{}]", text):
        return "markup"
    return None


def sentence_pair_filter(path=DEFAULT_PATH):
    """Every sentence pair of the Ding dictionary, and what was rejected.

    Each line `german :: english` holds `|`-separated aligned sub-entries.
    A sub-entry pair is kept when, after dropping usage labels (`[ugs.]`,
    `{f}`) and keeping the first of `;`-separated variants, both sides are
    sentences (capital first letter, final `.`, `!` or `?`) with no `/`
    alternatives or other markup. `REJECTED` says why each other kind is
    left out.

    Returns:
        `(pairs, rejected)`: sorted list of `(german, english)`, and a
        `collections.Counter` of rejected sub-entry pairs by kind.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: install the dictionary with "
            "`apt-get install trans-de-en`."
        )
    pairs, rejected = set(), collections.Counter()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#") or " :: " not in line:
                continue
            german, english = line.rstrip("\n").split(" :: ", 1)
            germans, englishes = german.split(" | "), english.split(" | ")
            if len(germans) != len(englishes):
                rejected["misaligned"] += len(germans)
                continue
            for de, en in zip(germans, englishes):
                de, en = _clean(de), _clean(en)
                reason = _rejection(de) or _rejection(en)
                if reason is None and (de, en) in pairs:
                    reason = "duplicate"
                if reason:
                    rejected[reason] += 1
                else:
                    pairs.add((de, en))
    return sorted(pairs), rejected


def load_sentence_pairs(path=DEFAULT_PATH, seed=0):
    """(german, english) sentence pairs of the Ding dictionary, shuffled.

    The pairs of `sentence_pair_filter`, shuffled with `seed` (about
    22,000).
    """
    pairs, _ = sentence_pair_filter(path)
    random.Random(seed).shuffle(pairs)
    return pairs


def train_sentencepiece(sentences, vocab_size):
    """Trains a unigram SentencePiece model offline; returns its bytes.

    Ids: 0 padding, 1 unknown, 2 start, 3 end of sentence.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def encode_pairs(pairs, source_model, target_model, max_length):
    """Token ids for training: `(source, target_in), target_out` arrays.

    Source: pieces + end; target in: start + pieces; target out: pieces +
    end. Pairs longer than `max_length` tokens on either side are dropped;
    the rest are padded with 0 to `max_length`.
    """
    import numpy as np
    import sentencepiece

    source_sp = sentencepiece.SentencePieceProcessor(model_proto=source_model)
    target_sp = sentencepiece.SentencePieceProcessor(model_proto=target_model)
    sources, targets_in, targets_out = [], [], []
    for german, english in pairs:
        source = source_sp.encode(german) + [EOS]
        target = target_sp.encode(english)
        if len(source) > max_length or len(target) + 1 > max_length:
            continue
        sources.append(source)
        targets_in.append([BOS] + target)
        targets_out.append(target + [EOS])

    def pad(rows):
        array = np.zeros((len(rows), max_length), "int32")
        for i, row in enumerate(rows):
            array[i, : len(row)] = row
        return array

    return (pad(sources), pad(targets_in)), pad(targets_out)


def bucketed_dataset(source, target_in, target_out, batch_size,
                     boundaries=(8, 12, 16, 20, 24, 32, 48), seed=0):
    """A shuffled `tf.data.Dataset` of `((source, target_in), target_out)`
    batches, each padded (with 0) only to its own longest pair.

    Pairs are grouped by length (`boundaries`, in tokens of the longer
    side), so that every pair can be trained on whatever its length while
    short ones are not padded to the longest.

    Args:
        source, target_in, target_out: int32 arrays `[pairs, max_length]`
            from `encode_pairs` (0 = padding).
        batch_size: int.
        boundaries: length buckets.
        seed: shuffling seed.
    """
    import numpy as np
    import tensorflow as tf

    lengths = np.maximum((source > 0).sum(1), (target_out > 0).sum(1))

    def pairs():
        for i, length in enumerate(lengths):
            yield ((source[i, :length], target_in[i, :length]),
                   target_out[i, :length])

    row = tf.TensorSpec([None], tf.int32)
    dataset = tf.data.Dataset.from_generator(
        pairs, output_signature=((row, row), row)
    ).shuffle(len(lengths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.bucket_by_sequence_length(
        lambda inputs, target: tf.shape(target)[0],
        bucket_boundaries=list(boundaries),
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=False,
    )
    # Which bucket a pair falls in depends on its length only, so the
    # number of batches is the same every epoch; stating it lets Keras
    # count steps (a generator's dataset has unknown cardinality).
    bucket = np.searchsorted(np.asarray(boundaries), lengths, side="right")
    batches = int(sum(-(-int(count) // batch_size)
                      for count in np.bincount(bucket) if count))
    return dataset.apply(
        tf.data.experimental.assert_cardinality(batches)
    ).prefetch(2)


def translation_model(
    source_vocab, target_vocab, model_dim=128, num_experts=16, hidden_units=256,
    k=2, dropout=0.2, seed=None, name=None,
):
    """LSTM encoder-decoder with attention and MoE layers (or none).

    Encoder: `Embedding -> LSTM -> MoE -> LSTM`; decoder (teacher forced):
    `Embedding -> LSTM (started from the encoder's final state) -> MoE ->
    dot-product attention over the encoder outputs -> Dense(tanh) -> logits`.
    Each MoE is a residual branch, `x + Dropout(MoE(x))`. `num_experts=0`
    builds the same model without the MoE layers (the baseline).

    Inputs: `source [B, S]` and `target_in [B, T]` int32 ids (0 = padding);
    output: logits `[B, T, target_vocab]`.
    """
    from keras_moe import layers as moe_layers

    source = keras.Input(shape=(None,), dtype="int32", name="source")
    target_in = keras.Input(shape=(None,), dtype="int32", name="target_in")

    def moe(x, label):
        if not num_experts:
            return x
        branch = moe_layers.MixtureOfExperts(
            num_experts, hidden_units, k=k, seed=seed, name=f"{label}_moe"
        )(x)
        return keras.layers.Add()([x, keras.layers.Dropout(dropout)(branch)])

    x = keras.layers.Embedding(source_vocab, model_dim, mask_zero=True,
                               name="source_embedding")(source)
    x = keras.layers.LSTM(model_dim, return_sequences=True, name="encoder_lstm_1")(x)
    x = moe(x, "encoder")
    encoded, state_h, state_c = keras.layers.LSTM(
        model_dim, return_sequences=True, return_state=True, name="encoder_lstm_2"
    )(x)

    y = keras.layers.Embedding(target_vocab, model_dim, mask_zero=True,
                               name="target_embedding")(target_in)
    y = keras.layers.LSTM(model_dim, return_sequences=True, name="decoder_lstm")(
        y, initial_state=[state_h, state_c]
    )
    y = moe(y, "decoder")
    context = keras.layers.Attention(name="attention")([y, encoded])
    y = keras.layers.Concatenate()([y, context])
    y = keras.layers.Dropout(dropout)(y)
    y = keras.layers.Dense(model_dim, activation="tanh", name="attention_output")(y)
    logits = keras.layers.Dense(target_vocab, name="logits")(y)
    if name is None:
        name = "moe_translator" if num_experts else "lstm_translator"
    return keras.Model([source, target_in], logits, name=name)


def greedy_decode(model, source, max_length):
    """Greedy translation of token ids `source [B, S]`: ids `[B, max_length]`.

    A fixed-size target buffer is filled one position per step (the
    decoder is causal and later positions are padding, so position `t`'s
    logits depend on positions `<= t` only). After the end token everything
    is 0.
    """
    import tensorflow as tf

    batch = tf.shape(source)[0]
    buffer = tf.concat(
        [tf.fill([batch, 1], BOS), tf.zeros([batch, max_length - 1], tf.int32)],
        axis=1,
    )
    done = tf.zeros([batch], tf.bool)
    outputs = tf.zeros([batch, max_length], tf.int32)
    for step in range(max_length):
        logits = model([source, buffer], training=False)
        token = tf.cast(tf.argmax(logits[:, step], axis=-1), tf.int32)
        token = tf.where(done, 0, token)
        column = tf.one_hot(step, max_length, dtype=tf.int32)[None, :]
        outputs += token[:, None] * column
        if step + 1 < max_length:
            next_column = tf.one_hot(step + 1, max_length, dtype=tf.int32)[None, :]
            buffer += tf.where(done, 0, token)[:, None] * next_column
        done = done | tf.equal(token, EOS)
    return outputs


class Translator:
    """Raw German strings in, English strings out (a `tf.Module`).

    Tokenises with `tensorflow_text.SentencepieceTokenizer` in the graph,
    decodes greedily with `model`, detokenises. Save it with
    `tf.saved_model.save(translator.module, path)`; the loaded object's
    `translate(tf.constant([...]))` returns a string tensor.
    """

    def __init__(self, model, source_model, target_model, max_length):
        import tensorflow as tf
        import tensorflow_text as tf_text

        module = tf.Module()
        module.model = model
        # Distinct names: the tokenizer's model is a kernel-owned resource
        # keyed by its op's name, and a reloaded SavedModel would otherwise
        # give both tokenizers the same (first) model.
        module.source_tokenizer = tf_text.SentencepieceTokenizer(
            model=source_model, add_eos=True, name="source_tokenizer"
        )
        module.target_tokenizer = tf_text.SentencepieceTokenizer(
            model=target_model, name="target_tokenizer"
        )

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def translate(sentences):
            tokens = module.source_tokenizer.tokenize(sentences)
            tokens = tokens[:, :max_length].to_tensor(default_value=PAD)
            ids = greedy_decode(module.model, tf.cast(tokens, tf.int32), max_length)
            keep = tf.cumsum(tf.cast(tf.equal(ids, EOS), tf.int32), axis=1) == 0
            keep &= ids > EOS  # drop padding, start, end
            ragged = tf.ragged.boolean_mask(ids, keep)
            return module.target_tokenizer.detokenize(ragged)

        module.translate = translate
        self.module = module

    def __call__(self, sentences):
        import tensorflow as tf

        result = self.module.translate(tf.constant(list(sentences)))
        return [text.decode("utf-8") for text in result.numpy()]


def corpus_bleu(references, hypotheses):
    """Corpus BLEU (0-100) with one reference per sentence, by `sacrebleu`.

    sacrebleu's defaults (13a tokenisation, case kept, BLEU-4 with the
    brevity penalty), the field's standard, so scores compare with
    published ones.
    """
    import sacrebleu

    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
