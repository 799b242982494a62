"""keras_moe.hub: keras-hub's Mixtral and Qwen-MoE blocks computed sparsely."""

import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_moe import hub  # noqa: E402


def _backbone(num_experts=4, top_k=2):
    keras.utils.set_random_seed(0)
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=24,
        num_experts=num_experts, top_k=top_k, dtype="float32",
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
        loss = tf.reduce_sum(outputs * probe) + tf.add_n(model.losses)
    return outputs, loss, tape.gradient(loss, model.trainable_variables)


def _assert_sparse_equals_dense(sparse, dense, seed):
    """Outputs, then the training loss (with the auxiliary losses) and every
    gradient of `sum(outputs * probe)`."""
    inputs = _inputs()
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
        np.testing.assert_allclose(
            tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(w).numpy(),
            rtol=1e-4, atol=1e-5,
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
    keras.utils.set_random_seed(0)
    return keras_hub.models.QwenMoeBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        moe_intermediate_dim=12, shared_expert_intermediate_dim=20,
        num_experts=6, top_k=2, norm_top_k_prob=False, dtype="float32",
    )


def test_sparse_qwen_moe_equals_keras_hub_in_outputs_losses_and_gradients():
    dense, sparse = _qwen_backbone(), _qwen_backbone()
    sparse.set_weights(dense.get_weights())
    assert len(hub.sparsify(sparse)) == 2
    _assert_sparse_equals_dense(sparse, dense, seed=(3, 4))


def test_sparse_blocks_on_jax_equal_keras_hub(tmp_path):
    pytest.importorskip("jax")
    from tests.subprocesses import run_python

    run_python(
        """
import numpy as np
import keras
from keras_moe import hub
from tests import test_hub
assert keras.backend.backend() == "jax"
inputs = test_hub._inputs()
for make in (test_hub._backbone, test_hub._qwen_backbone):
    dense, sparse = make(), make()
    sparse.set_weights(dense.get_weights())
    assert len(hub.sparsify(sparse)) == 2
    np.testing.assert_allclose(np.asarray(sparse(inputs)), np.asarray(dense(inputs)),
                               rtol=1e-5, atol=1e-5)
print("DONE")
""",
        tmp_path, env_extra={"KERAS_BACKEND": "jax"}, timeout=600,
    )
