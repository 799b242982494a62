"""The translation example's data parsing, BLEU and string-to-string export."""

import math

import numpy as np
import pytest

from keras_moe import translation

DING = """\
# Version :: 1.9
Haus {n} | Häuser {pl} :: house | houses
Ich bin müde. | Wir sind müde. :: I am tired. | We are tired.
Er kommt morgen. :: He is coming tomorrow. | He will come tomorrow.
Das ist mir egal. :: I don't care.
Sie liest ein Buch [ugs.]. :: She reads a book.
kein Satz hier. :: Not a sentence here.
Wie geht es dir? :: How are you?
Das war gut / schlecht. :: That was good/bad.
Bis bald!; Bis dann! :: See you soon!; See you!
Wie geht es dir? :: How are you?
"""


def test_sentence_pairs_keep_aligned_full_sentences(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(DING, encoding="utf-8")
    pairs = sorted(translation.load_sentence_pairs(str(path)))
    assert pairs == sorted([
        ("Ich bin müde.", "I am tired."),
        ("Wir sind müde.", "We are tired."),
        ("Das ist mir egal.", "I don't care."),
        ("Sie liest ein Buch.", "She reads a book."),  # label dropped
        ("Wie geht es dir?", "How are you?"),
        ("Bis bald!", "See you soon!"),  # the first variant
    ])
    _, rejected = translation.sentence_pair_filter(str(path))
    assert rejected == {"misaligned": 1, "phrase": 3, "alternatives": 1, "duplicate": 1}
    assert set(rejected) <= set(translation.REJECTED)
    with pytest.raises(FileNotFoundError, match="apt-get install trans-de-en"):
        translation.load_sentence_pairs(str(tmp_path / "missing"))


def test_corpus_bleu_by_sacrebleu_against_a_hand_computed_value():
    reference = "The cat sat on the mat."
    # 1..4-gram precisions 6/7, 4/6, 2/5, 1/4; equal lengths: no brevity penalty
    expected = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    got = translation.corpus_bleu([reference], ["The cat sat on a mat."])
    assert got == pytest.approx(expected, rel=1e-9)
    assert translation.corpus_bleu([reference], [reference]) == pytest.approx(100.0)
    # a short hypothesis pays the brevity penalty exp(1 - r / c)
    short = translation.corpus_bleu(["a b c d e f g h"], ["a b c d e f"])
    assert short == pytest.approx(100 * math.exp(1 - 8 / 6))
    assert translation.corpus_bleu(["x y z"], ["p q r"]) == 0.0


def test_translator_maps_raw_strings_to_strings_and_exports(tmp_path):
    pytest.importorskip("tensorflow_text")
    pytest.importorskip("sentencepiece")
    import keras
    import tensorflow as tf

    pairs = [(f"Ich sehe {n} Hunde.", f"I see {n} dogs.") for n in
             ("zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")] * 8
    source = translation.train_sentencepiece([d for d, _ in pairs], 40)
    target = translation.train_sentencepiece([e for _, e in pairs], 40)
    (x, y_in), y_out = translation.encode_pairs(pairs, source, target, max_length=32)
    assert x.shape == y_in.shape == y_out.shape == (64, 32)
    # target in = start + pieces, target out = pieces + end
    row = y_out[0][y_out[0] > 0]
    np.testing.assert_array_equal(y_in[0][1 : len(row)], row[:-1])
    assert y_in[0][0] == translation.BOS and row[-1] == translation.EOS

    keras.utils.set_random_seed(0)
    model = translation.translation_model(40, 40, model_dim=16, num_experts=4,
                                          hidden_units=16, seed=0)
    assert model.get_layer("encoder_moe") and model.get_layer("decoder_moe")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=0))
    model.fit([x, y_in], y_out, epochs=1, verbose=0)
    translator = translation.Translator(model, source, target, max_length=6)
    out = translator(["Ich sehe zwei Hunde.", "Ich sehe acht Hunde."])
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    tf.saved_model.save(translator.module, str(tmp_path / "translator"))
    loaded = tf.saved_model.load(str(tmp_path / "translator"))
    again = loaded.translate(tf.constant(["Ich sehe zwei Hunde.", "Ich sehe acht Hunde."]))
    assert [t.decode() for t in again.numpy()] == out
