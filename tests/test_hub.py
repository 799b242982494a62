"""keras_moe.integrations.keras_hub: keras-hub's MoE blocks computed sparsely."""

import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_moe.integrations import keras_hub as hub  # noqa: E402


def _tiny(name, **config):
    """A tiny keras-hub backbone `name`, seeded: 2 layers, width 16."""
    keras.utils.set_random_seed(0)
    return getattr(keras_hub.models, name)(
        vocabulary_size=50, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, dtype="float32", **config,
    )


def _backbone(num_experts=4, top_k=2):
    return _tiny(
        "MixtralBackbone", intermediate_dim=24, num_experts=num_experts,
        top_k=top_k
    )


def _inputs(batch=3, length=7):
    rng = np.random.default_rng(0)
    mask = np.ones((batch, length), "int32")
    mask[0, 5:] = 0
    return {
        "token_ids": rng.integers(1, 50, size=(batch, length)).astype("int32"),
        "padding_mask": mask,
    }


def _loss_and_gradients(model, inputs, probe):
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        loss = tf.reduce_sum(outputs * probe)
        for auxiliary in model.losses:  # none in GPT-OSS and Gemma 4
            loss = loss + auxiliary
    return outputs, loss, tape.gradient(loss, model.trainable_variables)


def _assert_sparse_equals_dense(sparse, dense, seed, inputs=None):
    """Outputs, then the training loss (with the auxiliary losses) and every
    gradient of `sum(outputs * probe)`."""
    inputs = inputs or _inputs()
    np.testing.assert_allclose(
        sparse(inputs).numpy(), dense(inputs).numpy(), rtol=1e-5, atol=1e-5
    )
    probe = tf.random.stateless_normal((3, 7, 16), seed=seed)
    want = _loss_and_gradients(dense, inputs, probe)
    got = _loss_and_gradients(sparse, inputs, probe)
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-5)
    assert sum(w is not None for w in want[2]) > 10
    for g, w in zip(got[2], want[2]):
        if w is None:  # a weight the loss does not reach, in both
            assert g is None
            continue
        w = tf.convert_to_tensor(w).numpy()
        # float32 round-off, relative to the gradient's own scale
        np.testing.assert_allclose(
            tf.convert_to_tensor(g).numpy(), w, rtol=1e-4,
            atol=1e-5 * max(1.0, np.abs(w).max()),
        )


@pytest.mark.parametrize("classes", [False, True])
def test_sparse_mixtral_equals_keras_hub_in_outputs_losses_and_gradients(classes, request):
    if classes:
        request.getfixturevalue("classes_always")
    dense, sparse = _backbone(num_experts=6), _backbone(num_experts=6)
    sparse.set_weights(dense.get_weights())
    changed = hub.sparsify(sparse)
    assert len(changed) == 2  # one block per decoder layer
    assert hub.sparsify(sparse) == []  # once only
    _assert_sparse_equals_dense(sparse, dense, seed=(1, 2))
    assert len(sparse.losses) == 2  # the auxiliary loss of each block


def test_sparsify_finds_nothing_in_other_models():
    inputs = keras.Input((4,))
    assert hub.sparsify(keras.Model(inputs, keras.layers.Dense(2)(inputs))) == []


def _qwen_backbone():
    return _tiny(
        "QwenMoeBackbone", intermediate_dim=32, moe_intermediate_dim=12,
        shared_expert_intermediate_dim=20, num_experts=6, top_k=2,
        norm_top_k_prob=False
    )


def _qwen3_backbone():
    return _tiny(
        "Qwen3MoeBackbone", intermediate_dim=32, moe_intermediate_dim=12,
        num_experts=6, top_k=2, head_dim=8, norm_top_k_prob=True,
        router_aux_loss_coefficient=0.01
    )


def _qwen3_5_backbone():
    return _tiny(
        "Qwen3_5MoeBackbone", head_dim=8, moe_intermediate_dim=12,
        shared_expert_intermediate_size=20, num_experts=6, top_k=2,
        linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8,
        router_aux_loss_coefficient=0.01
    )


def _gpt_oss_backbone():
    backbone = _tiny(
        "GptOssBackbone", intermediate_dim=12, num_experts=6, top_k=2,
        head_dim=8
    )
    _randomize(backbone, "GptOssExperts")  # its biases start at zero
    return backbone


def _gemma4_backbone():
    backbone = _tiny(
        "Gemma4Backbone", image_size=16, intermediate_dim=24, head_dim=8,
        enable_moe_block=True, num_experts=6, expert_intermediate_dim=12,
        num_experts_per_token=2
    )
    _randomize(backbone, "Gemma4MoEBlock")  # its experts start at zero
    return backbone


def _randomize(model, class_name):
    """Gives `class_name`'s weights random values (scales near 1)."""
    rng = np.random.default_rng(1)
    for layer in model._flatten_layers():
        if type(layer).__name__ != class_name:
            continue
        for weight in layer.weights:
            noise = rng.normal(size=weight.shape).astype("float32")
            if len(weight.shape) == 1:  # Gemma 4's per-expert scale
                weight.assign(1.0 + 0.3 * noise)
            else:
                weight.assign(0.3 * noise)


def _gemma4_inputs():
    inputs = _inputs()
    inputs["position_ids"] = np.tile(np.arange(7, dtype="int32"), (3, 1))
    return inputs


# {model: (tiny backbone, its inputs, auxiliary losses per training call)}
MODELS = {
    "qwen_moe": (_qwen_backbone, _inputs, 2),
    "qwen3_moe": (_qwen3_backbone, _inputs, 2),
    "qwen3_5_moe": (_qwen3_5_backbone, _inputs, 2),
    "gpt_oss": (_gpt_oss_backbone, _inputs, 0),
    "gemma4": (_gemma4_backbone, _gemma4_inputs, 0),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparse_blocks_equal_keras_hub_in_outputs_losses_and_gradients(name):
    make, inputs, num_losses = MODELS[name]
    dense, sparse = make(), make()
    sparse.set_weights(dense.get_weights())
    assert len(hub.sparsify(sparse)) == 2
    _assert_sparse_equals_dense(sparse, dense, seed=(5, 6), inputs=inputs())
    assert len(sparse.losses) == num_losses


def _greedy_lm(backbone):
    lm = keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    lm.compile(
        optimizer=keras.optimizers.SGD(0.1), sampler="greedy",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


def test_sparse_causal_lm_generates_fits_saves_and_loads_like_keras_hub(tmp_path):
    dense = _greedy_lm(_backbone(num_experts=6))
    sparse = _greedy_lm(_backbone(num_experts=6))
    sparse.set_weights(dense.get_weights())
    assert len(hub.sparsify(sparse)) == 2
    prompt = {
        "token_ids": np.array([[5, 9, 2, 0, 0, 0, 0, 0]] * 2, "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, "int32"),
    }
    want = dense.generate(prompt, stop_token_ids=None)
    got = sparse.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(got["token_ids"], want["token_ids"])
    assert (got["padding_mask"].sum(axis=1) == 8).all()  # filled to the end

    # One fit step: the same weights after it.
    inputs = _inputs()
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    for lm in (dense, sparse):
        lm.fit(inputs, labels, sample_weight=inputs["padding_mask"],
               batch_size=3, epochs=1, verbose=0, shuffle=False)
    for got_weight, want_weight in zip(sparse.weights, dense.weights):
        np.testing.assert_allclose(
            got_weight.numpy(), want_weight.numpy(), rtol=1e-5, atol=1e-6,
            err_msg=got_weight.path,
        )

    # Saved and loaded: keras-hub's dense blocks, the same weights;
    # sparsified again, the same predictions.
    sparse.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert len(hub.sparsify(loaded)) == 2
    np.testing.assert_allclose(
        loaded.predict(inputs, verbose=0), dense.predict(inputs, verbose=0),
        rtol=1e-5, atol=1e-5,
    )


def test_sparse_blocks_on_jax_equal_keras_hub(tmp_path):
    pytest.importorskip("jax")
    from tests.subprocesses import run_python

    run_python(
        """
import numpy as np
import keras
from keras_moe.integrations import keras_hub as hub
from tests import test_hub
assert keras.backend.backend() == "jax"
cases = [(test_hub._backbone, test_hub._inputs)]
cases += [case[:2] for case in test_hub.MODELS.values()]
for make, make_inputs in cases:
    inputs = make_inputs()
    dense, sparse = make(), make()
    sparse.set_weights(dense.get_weights())
    assert len(hub.sparsify(sparse)) == 2
    np.testing.assert_allclose(np.asarray(sparse(inputs)), np.asarray(dense(inputs)),
                               rtol=1e-5, atol=1e-5)
print("DONE")
""",
        tmp_path, env_extra={"KERAS_BACKEND": "jax"}, timeout=600,
    )
