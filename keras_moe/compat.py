"""Every place where keras_moe leans on a Keras or TensorFlow internal.

Each function below works around one upstream behaviour, says which, and
has a test in `tests/test_compat.py` that fails when upstream changes that
behaviour (or the internal it uses), so an upgrade shows at once what can
go. Nothing else in the package touches a private attribute of Keras or
TensorFlow or imports `tensorflow.python`. Imports nothing of the package;
TensorFlow is imported inside the functions that need it.
"""

import threading


# Keras layers ------------------------------------------------------------


class PerThreadLosses:
    """Mixin for a Layer: one `add_loss` list per thread.

    Under a `tf.distribute` mirrored strategy every replica runs the model
    in a thread of its own, and a cross-replica all-reduce in the middle of
    a layer's call hands control to the other replicas. Keras 3 keeps a
    layer's losses in one list (`Layer._losses`), cleared when a call
    starts: the replicas would then see, and clear, each other's losses.
    Overriding that private attribute with a thread-local list gives every
    replica its own. (Keras 3.15: `Layer.add_loss` appends to
    `self._losses`, `Layer._clear_losses` resets it, `Layer.losses` reads
    it.)
    """

    def _per_thread(self):
        if "_losses_per_thread" not in self.__dict__:
            object.__setattr__(self, "_losses_per_thread", threading.local())
        return self.__dict__["_losses_per_thread"]

    @property
    def _losses(self):
        per_thread = self._per_thread()
        if not hasattr(per_thread, "losses"):
            per_thread.losses = []
        return per_thread.losses

    @_losses.setter
    def _losses(self, value):
        self._per_thread().losses = list(value)


def flatten_layers(model):
    """Every layer nested in `model` (not `model` itself), depth first.

    Keras 3 has no public walk over the layers nested inside custom layers
    (`model.layers` lists the top level only); `Layer._flatten_layers` is
    the one Keras uses itself (for `model.weights`, saving, summaries).
    """
    return list(model._flatten_layers(include_self=False))


def in_xla_context():
    """True while TensorFlow traces a function for XLA (`jit_compile=True`).

    TensorFlow has no public way to ask; `control_flow_util` is what
    `tf.function` itself consults.
    """
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return bool(
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    )


def in_tensorflow_xla_context():
    """`in_xla_context()` on the TensorFlow backend; False on the others."""
    import keras

    return keras.backend.backend() == "tensorflow" and in_xla_context()


def standard_normal(shape, seed_generator):
    """`keras.random.normal(shape, seed=seed_generator)`, float32, with
    TensorFlow's Philox named under XLA.

    Keras draws with `alg="auto_select"`, which XLA:CPU (TensorFlow 2.21)
    compiles to a draw 30 times slower than Philox when the seed is not a
    constant (a `SeedGenerator`'s never is): 900 ms against 30 ms for the
    gate noise of N=4,096 positions and 1,024 experts. Without XLA, and on
    other backends, Keras' own draw (`auto_select` is Philox on CPU and
    GPU there); under XLA, XLA's Philox samples (Keras' draw there differs
    from its eager one too).
    """
    import keras

    if not in_tensorflow_xla_context():
        # Keras' own draw (also the one DTensor runs: naming the algorithm
        # adds a seed-scrambling op DTensor cannot place).
        return keras.random.normal(shape, seed=seed_generator)
    import tensorflow as tf

    seed = seed_generator.next()
    if seed.dtype != tf.int32:
        # As Keras casts its int64 seed state (`floormod` into int32).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    return tf.random.stateless_normal(shape, seed=seed, alg="philox")


def take_along_last_axis(values, indices):
    """`keras.ops.take_along_axis(values, indices, axis=-1)` for indices in
    range, with a fast gradient on TensorFlow.

    Keras' TensorFlow `take_along_axis` casts the indices to int64 before
    its batched `tf.gather`, and the gradient of that gather, an
    `UnsortedSegmentSum` with int64 segment ids, is 15 times slower on CPU
    than with int32 ones (TensorFlow 2.21): 16 ms against 1 ms for the top
    3 of N=4,096 rows of 1,024 gate logits, in every training step. On
    TensorFlow the same batched gather with the int32 indices; on other
    backends Keras' own.

    Args:
        values: tensor `[..., n]`.
        indices: int tensor `[..., m]` of entries in `[0, n)` (no negative
            indices: they are not wrapped here), same leading shape.

    Returns:
        tensor `[..., m]`, `values[..., indices]` row by row.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return keras.ops.take_along_axis(values, indices, axis=-1)
    import tensorflow as tf

    return tf.gather(
        values, tf.cast(indices, tf.int32), batch_dims=len(values.shape) - 1
    )


def take_per_row(values, indices):
    """`values[n, indices[n, j], ...]`: for each row `n`, the entries of its
    second axis that `indices[n]` names, with the fast gradient of
    `take_along_last_axis` on TensorFlow.

    Args:
        values: tensor `[N, a, ...]`.
        indices: int tensor `[N, m]` of entries in `[0, a)`.

    Returns:
        tensor `[N, m, ...]`.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        expanded = keras.ops.reshape(
            indices, tuple(indices.shape) + (1,) * (len(values.shape) - 2)
        )
        return keras.ops.take_along_axis(values, expanded, axis=1)
    import tensorflow as tf

    return tf.gather(values, tf.cast(indices, tf.int32), batch_dims=1)


# Keras variables, models and optimizers (used by ExpertParallel) ----------


def replace_variable_storage(variable, storage):
    """Makes a Keras (TensorFlow-backend) variable read and write `storage`.

    Keras 3 has no public way to change where a created variable lives;
    its TensorFlow `Variable` keeps the `tf.Variable` in `_value`, and
    `variable.value`, assignments and the optimizer all go through it.
    `ExpertParallel` swaps in a DTensor `DVariable` this way.
    """
    variable._value = storage


def pin_step_functions(model, train_function, test_function,
                       predict_function):
    """Makes `fit`/`evaluate`/`predict` run the given step functions.

    Keras' TensorFlow trainer builds its step functions in
    `make_{train,test,predict}_function(force=False)` and calls them
    again (rebuilding when asked to) from `fit`, `evaluate` and
    `predict`; there is no public hook to supply one's own. Setting the
    functions and making the builders return them keeps ours in place.
    """
    model.train_function = train_function
    model.test_function = test_function
    model.predict_function = predict_function
    model.make_train_function = lambda force=False: model.train_function
    model.make_test_function = lambda force=False: model.test_function
    model.make_predict_function = lambda force=False: model.predict_function


def wrap_optimizer(optimizer, on_slot_created=None, transform_gradients=None):
    """Hooks into a Keras optimizer's slot creation and gradient application.

    Keras 3 optimizers create every slot through
    `add_variable_from_reference(reference_variable, name, ...)` and apply
    every update through `apply(grads, trainable_variables=None)`; neither
    has a public hook. `on_slot_created(slot, reference_variable)` is
    called for each new slot; `transform_gradients(grads)` returns the
    gradients to apply instead.
    """
    if on_slot_created is not None:
        create = optimizer.add_variable_from_reference

        def add_variable_from_reference(reference_variable, *args, **kwargs):
            slot = create(reference_variable, *args, **kwargs)
            on_slot_created(slot, reference_variable)
            return slot

        optimizer.add_variable_from_reference = add_variable_from_reference
    if transform_gradients is not None:
        apply = optimizer.apply

        def apply_transformed(grads, trainable_variables=None):
            return apply(transform_gradients(grads), trainable_variables)

        optimizer.apply = apply_transformed


# tf.distribute -------------------------------------------------------------


def elementwise_strategy_reduce(strategy):
    """Lets Keras 3's `fit` reduce with a `MultiWorkerMirroredStrategy`.

    keras-team/keras#20585: Keras 3.15's `fit` calls
    `strategy.reduce("MEAN", (x, y))` on a whole per-replica batch to build
    the model, which that strategy cannot reduce as one structure
    (`ValueError: Attempt to convert a value (PerReplica...`), then
    `strategy.reduce("MEAN", log, axis=0)` on scalar logs
    (`Invalid reduction dimension 0 for input with 0 dimensions`). The
    strategy's `reduce` is replaced by one that reduces nested structures
    element by element, and scalars across replicas only.

    Returns:
        `strategy`, changed in place.
    """
    import tensorflow as tf

    reduce_one = strategy.reduce

    def rank(item):
        if isinstance(item, tf.distribute.DistributedValues):
            item = strategy.experimental_local_results(item)[0]
        return getattr(item, "shape", tf.TensorShape(None)).rank

    def reduce(reduce_op, value, axis=None):
        def reduce_item(item):
            item_axis = None if rank(item) == 0 else axis
            return reduce_one(reduce_op, item, axis=item_axis)

        return tf.nest.map_structure(reduce_item, value)

    strategy.reduce = reduce
    return strategy


# DTensor ---------------------------------------------------------------------

# TensorFlow 2.21's DTensor trains models of one mesh per process: a second
# model on a mesh of another shape fails at its first step ("All inputs to
# `tf_device.Cluster` must have same mesh configuration"), while several
# models on one mesh work. The first mesh used is remembered here so that
# `ExpertParallel.distribute` can refuse another with a clear error.
_process_mesh = []


def claimed_process_mesh():
    """The DTensor mesh (its string form) this process trains on, or None."""
    return _process_mesh[0] if _process_mesh else None


def claim_process_mesh(mesh_description):
    """Records the DTensor mesh (its string form) this process trains on."""
    _process_mesh[:] = [mesh_description]
