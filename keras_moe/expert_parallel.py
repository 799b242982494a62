"""Expert parallelism: one copy of each expert, its weights on one device.

PAPER.md section 5: data parallelism alone replicates every expert on every
device, so the model is capped by one device's memory. Here the stacked
expert weights (`[E, d, h]`, `[E, h]`, `[E, h, d_out]`, `[E, d_out]`) are
sharded along their expert axis over an `expert` mesh axis, so each of
`n` devices holds `E / n` experts; everything else is replicated (or
sharded by batch over a `batch` axis).

Two backends, one idea:

- TensorFlow: `ExpertParallel` builds a `tf.experimental.dtensor` mesh,
  moves a built, compiled Keras model's variables onto it (expert weights
  sharded, the rest replicated) and gives the model train/test/predict
  functions that pack each batch onto the mesh, so `model.fit`,
  `evaluate` and `predict` work unchanged.
- JAX: `jax_model_parallel` returns a `keras.distribution.ModelParallel`
  whose `LayoutMap` shards the expert axis of every MoE weight; set it with
  `keras.distribution.set_distribution` before building the model.
- Several hosts, the same script on each: `cluster_from_environment` reads
  this host's place (`TF_CONFIG`, or `KERAS_MOE_*` variables);
  `jax_cluster_model_parallel` joins JAX's distributed runtime and shards
  over every process's devices; `initialize_dtensor_cluster` makes this
  process a DTensor client, after which `ExpertParallel` meshes span all
  clients.

Inside a step (TensorFlow), for each MoE layer: the gate runs where the
tokens are; `dispatch` gathers the `[E, C, d]` buffer, which is relaid out
to the expert-sharded layout (with a batch-sharded mesh this is the
all-to-all; with all devices on the expert axis each device just keeps its
experts' rows); each device runs its `E / n` experts on its rows; the
`[E, C, d_out]` outputs are relaid out to the token layout (an all-gather)
and combined. Gradients flow back the same way.
"""

import contextlib
import functools

import keras

from keras_moe import compat
from keras_moe import layers as moe_layers

BATCH_AXIS = "batch"
EXPERT_AXIS = "expert"


def _expert_layers(model):
    return [
        layer
        for layer in compat.flatten_layers(model)
        if isinstance(layer, moe_layers.MixtureOfExpertsBase)
    ]


def _check_expert_count(layer, shards):
    if layer.num_experts % shards:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}' has "
            f"num_experts={layer.num_experts}, which does not divide over "
            f"{shards} expert shards; use a multiple of {shards}."
        )


class ExpertParallel:
    """Shards MoE experts over devices with DTensor (TensorFlow backend).

    A mesh of `batch_shards x expert_shards` devices (GPUs when there are
    any, else CPUs; see `distribution.use_virtual_cpu_devices`). Every MoE
    layer's stacked expert weights are sharded along the expert axis, so a
    device holds `num_experts / expert_shards` experts; all other variables
    (embeddings, LSTMs, gates, optimizer slots of those) are replicated, and
    batches are split over the `batch` axis.

    Usage:

    ```python
    model = keras.Model(...)          # any model with MoE layers
    model.compile(optimizer, loss)
    parallel = ExpertParallel()       # all devices on the expert axis
    parallel.distribute(model)
    model.fit(dataset, epochs=2)      # unchanged
    ```

    Recurrent layers must be built with `unroll=True`: DTensor has no layout
    propagation for the TensorList ops of a `while` loop over time
    (`'tf.EmptyTensorList' op does not implement layout propagation`).
    MoE layers need a `capacity_factor`: DTensor needs static shapes, and a
    dropless buffer's size depends on the routing. `distribute` checks both.

    Saving: `distribute` makes the model's `save_weights`, `load_weights`,
    `save` and `export` (and so `ModelCheckpoint` and `BackupAndRestore`)
    gather every weight, optimizer slot and metric to the host first and
    scatter loaded values back to their shards (`on_host`), so files are
    ordinary Keras files that load into an unsharded model and back.

    Args:
        expert_shards: devices on the expert axis (default: all devices
            divided by `batch_shards`).
        batch_shards: devices on the batch axis (default 1). Global batch
            sizes must be divisible by it.
        device_type: "GPU" or "CPU"; default GPU when present.
    """

    def __init__(self, expert_shards=None, batch_shards=1, device_type=None):
        import tensorflow as tf
        from tensorflow.experimental import dtensor

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "ExpertParallel uses DTensor and needs the TensorFlow backend; "
                "on JAX use keras_moe.expert_parallel.jax_model_parallel()."
            )
        if device_type is None:
            device_type = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        # Several processes (`initialize_dtensor_cluster`): the mesh spans
        # every client's devices, these local ones included.
        multi_client = dtensor.num_clients() > 1
        devices = tf.config.list_logical_devices(device_type)
        device_count = (
            dtensor.num_global_devices(device_type) if multi_client
            else len(devices)
        )
        if batch_shards < 1:
            raise ValueError(f"`batch_shards` must be >= 1. Received: {batch_shards}")
        if expert_shards is None:
            expert_shards = device_count // batch_shards
        if expert_shards < 1 or batch_shards * expert_shards > device_count:
            raise ValueError(
                f"A {batch_shards} x {expert_shards} mesh needs "
                f"{batch_shards * expert_shards} {device_type} devices; "
                f"there are {device_count}."
            )
        self._tf = tf
        self._dtensor = dtensor
        self.batch_shards = batch_shards
        self.expert_shards = expert_shards
        axes = [(BATCH_AXIS, batch_shards), (EXPERT_AXIS, expert_shards)]
        if multi_client:
            self.mesh = dtensor.create_distributed_mesh(
                axes, device_type=device_type
            )
        else:
            self.mesh = dtensor.create_mesh(
                axes,
                devices=[d.name for d in devices[: batch_shards * expert_shards]],
                device_type=device_type,
            )

    # Layouts -------------------------------------------------------------

    def replicated(self, rank):
        return self._dtensor.Layout.replicated(self.mesh, rank)

    def expert_layout(self, rank):
        """Sharded on axis 0 over the expert axis, the rest unsharded."""
        unsharded = [self._dtensor.UNSHARDED] * (rank - 1)
        return self._dtensor.Layout([EXPERT_AXIS] + unsharded, self.mesh)

    def batch_layout(self, rank):
        return self._dtensor.Layout.batch_sharded(self.mesh, BATCH_AXIS, rank)

    def relayout(self, tensor, layout):
        return self._dtensor.relayout(tensor, layout)

    def layout_of(self, variable):
        """The DTensor layout a (Keras) variable lives in."""
        value = getattr(variable, "value", variable)
        return self._dtensor.fetch_layout(value)

    def pack(self, value, layout):
        """Copies a host value onto the mesh in `layout`."""
        tensor = self._tf.convert_to_tensor(value)
        on_mesh = self._dtensor.copy_to_mesh(tensor, self.replicated(layout.rank))
        return on_mesh if layout.is_fully_replicated() else self.relayout(on_mesh, layout)

    def _read(self, value):
        value = getattr(value, "value", value)  # Keras variable -> tf variable
        if isinstance(value, self._tf.Variable):
            value = value.read_value()
        return value

    def local_values(self, variable):
        """The per-device pieces of a variable, in mesh device order."""
        return self._dtensor.unpack(self._read(variable))

    def expert_placement(self, model):
        """Which experts each of this process's devices holds:
        `{layer name: {device: range}}`."""
        locations = self.mesh.local_device_locations()
        placement = {}
        for layer in _expert_layers(model):
            pieces = self.local_values(next(iter(layer.expert_variables.values())))
            devices = {}
            for piece, location in zip(pieces, locations):
                start = location[EXPERT_AXIS] * piece.shape[0]
                devices[piece.device] = range(start, start + piece.shape[0])
            placement[layer.name] = devices
        return placement

    def to_numpy(self, value):
        """A (replicated or sharded) DTensor, or anything else, as NumPy."""
        value = self._read(value)
        if self._dtensor.is_dtensor(value):
            layout = self._dtensor.fetch_layout(value)
            if not layout.is_fully_replicated():
                value = self.relayout(value, self.replicated(layout.rank))
            value = self._dtensor.unpack(value)[0]
        return keras.ops.convert_to_numpy(value)

    # Variables -----------------------------------------------------------

    def _place(self, variable, layout):
        """Moves a Keras variable's storage onto the mesh in `layout`."""
        if self._dtensor.is_dtensor(variable.value):
            return
        packed = self.pack(variable.value, layout)
        compat.replace_variable_storage(
            variable,
            self._dtensor.DVariable(
                packed, trainable=variable.trainable, name=variable.name
            ),
        )

    def _place_remaining(self, variables):
        for variable in variables:
            self._place(variable, self.replicated(len(variable.shape)))

    def distribute(self, model):
        """Places a built, compiled `model` on the mesh; returns `model`.

        Expert weights are sharded on the expert axis, everything else is
        replicated. The model's train/test/predict functions are replaced by
        ones that pack each batch onto the mesh (batch-sharded) and run the
        Keras step under DTensor, so `fit`, `evaluate` and `predict` work as
        usual. Call it once, after `compile` and before `fit`.
        """
        if not model.built:
            raise ValueError(
                "ExpertParallel.distribute needs a built model (a functional "
                "model, or call it on a batch first)."
            )
        if model.optimizer is None:
            raise ValueError("Compile the model before ExpertParallel.distribute.")
        for layer in compat.flatten_layers(model):
            if isinstance(layer, keras.layers.RNN) and not layer.unroll:
                raise ValueError(
                    f"{layer.__class__.__name__} '{layer.name}' must be built "
                    "with unroll=True under DTensor: its while loop's TensorList "
                    "ops have no DTensor layout propagation."
                )
        claimed = compat.claimed_process_mesh()
        if claimed is not None and claimed != self.mesh.to_string():
            raise ValueError(
                "This process already placed a model on a different DTensor "
                f"mesh ({claimed}); TensorFlow's DTensor trains "
                "models of one mesh per process. Use the same expert_shards "
                "and batch_shards, or a new process."
            )
        experts = _expert_layers(model)
        if not experts:
            raise ValueError("The model has no MixtureOfExperts layers to shard.")
        for layer in experts:
            _check_expert_count(layer, self.expert_shards)
            if layer.capacity_factor is None or layer.eval_capacity_factor is None:
                raise ValueError(
                    f"{layer.__class__.__name__} '{layer.name}' is dropless "
                    "(capacity_factor=None or eval_capacity_factor=None), "
                    "whose buffer size depends on the routing; DTensor needs "
                    "static shapes. Give it a capacity_factor (e.g. 2.0) to "
                    "shard its experts."
                )
            for variable in layer.expert_variables.values():
                self._place(variable, self.expert_layout(len(variable.shape)))
            layer.set_expert_relayout(self._to_expert_layout,
                                      self._to_token_layout)
        self._place_remaining(model.variables)
        self._watch_optimizer(model.optimizer)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        compat.pin_step_functions(
            model,
            self._function(model, model.train_step),
            self._function(model, model.test_step),
            self._function(model, model.predict_step),
        )
        self._host_savers(model)
        compat.claim_process_mesh(self.mesh.to_string())
        return model

    def _to_expert_layout(self, buffer):
        """The dispatched `[E, C, d]` buffer, relaid out to the expert
        shards (the all-to-all when the mesh has a batch axis)."""
        return self.relayout(buffer, self.expert_layout(len(buffer.shape)))

    def _to_token_layout(self, outputs):
        """The experts' `[E, C, d_out]` outputs, replicated for `combine`
        (an all-gather)."""
        return self.relayout(outputs, self.replicated(len(outputs.shape)))

    def unsharded_weights(self, model):
        """`model.get_weights()` gathered to the host (NumPy arrays)."""
        return [self.to_numpy(variable) for variable in model.weights]

    def _mesh_variables(self, model):
        """Every variable of `model`, its optimizer and metrics that lives
        on the mesh, each once."""
        variables, seen = [], set()
        for variable in (
            list(model.variables)
            + list(getattr(model.optimizer, "variables", []))
            + list(model.metrics_variables)
        ):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            if self._dtensor.is_dtensor(getattr(variable, "value", None)):
                variables.append(variable)
        return variables

    @contextlib.contextmanager
    def on_host(self, model, write_back=True):
        """Every mesh variable of `model` (weights, optimizer slots,
        metrics) as an ordinary host variable inside the block.

        Each is gathered to the host on entry; on exit its host value
        (changed, e.g., by `load_weights`) is scattered back to its shards
        in its layout and the mesh variable takes its place again, so the
        traced train/test/predict steps keep working. `distribute` runs
        Keras' savers this way: `save_weights` (and so `ModelCheckpoint`),
        `load_weights` (and so `BackupAndRestore`), `save` and `export`.

        Args:
            model: a model placed by `distribute`.
            write_back: copy the host values back to the mesh on exit
                (False when the block only reads, as a save does).
        """
        tf = self._tf
        placed = []
        for variable in self._mesh_variables(model):
            mesh_variable = variable.value
            layout = self._dtensor.fetch_layout(mesh_variable)
            host = tf.Variable(
                self.to_numpy(variable), trainable=mesh_variable.trainable,
                name=mesh_variable.name.split(":")[0],
            )
            compat.replace_variable_storage(variable, host)
            placed.append((variable, mesh_variable, layout))
        experts = _expert_layers(model)
        for layer in experts:  # what is traced on the host (export) has no
            layer.set_expert_relayout(None, None)  # relayouts
        try:
            yield model
        finally:
            for layer in experts:
                layer.set_expert_relayout(self._to_expert_layout,
                                          self._to_token_layout)
            for variable, mesh_variable, layout in placed:
                if write_back:
                    mesh_variable.assign(
                        self.pack(variable.value.read_value(), layout)
                    )
                compat.replace_variable_storage(variable, mesh_variable)

    def _host_savers(self, model):
        """Makes the model's savers and loaders run `on_host`."""

        def wrap(method, write_back):
            @functools.wraps(method)
            def on_host(*args, **kwargs):
                with self.on_host(model, write_back=write_back):
                    return method(*args, **kwargs)

            return on_host

        for name, write_back in (("save_weights", False), ("save", False),
                                 ("export", False), ("load_weights", True)):
            setattr(model, name, wrap(getattr(model, name), write_back))

    def _watch_optimizer(self, optimizer):
        """Optimizer slots take the layout of their variable; gradients are
        applied replicated and dense.

        Two DTensor gaps (TF 2.21), worked around here:
        - sparse updates (ResourceScatterSub, from an Embedding's
          IndexedSlices gradient) have no layout propagation: gradients
          are applied densely;
        - an optimizer update whose gradient is sharded like its variable
          and slots reads stale slots (Adam moved sharded weights by 0 or
          by m / epsilon; plain DVariable ops and replicated gradients are
          right): gradients are relaid out to replicated before the
          update. Each device then briefly holds a full expert gradient;
          the weights and slots stay sharded.
        """
        tf = self._tf

        def place_slot(slot, reference_variable):
            self._place(slot, self.layout_of(reference_variable))

        def replicated_dense(grads):
            replicated = []
            for grad in grads:
                if isinstance(grad, tf.IndexedSlices):
                    grad = tf.convert_to_tensor(grad)
                if grad is not None:
                    grad = self.relayout(grad, self.replicated(grad.shape.rank))
                replicated.append(grad)
            return replicated

        compat.wrap_optimizer(
            optimizer,
            on_slot_created=place_slot,
            transform_gradients=replicated_dense,
        )

    # Steps ---------------------------------------------------------------

    def _pack_batch(self, data):
        def pack(value):
            value = self._tf.convert_to_tensor(value)
            rank = value.shape.rank
            if rank and self.batch_shards > 1:
                if value.shape[0] % self.batch_shards:
                    raise ValueError(
                        f"A batch of {value.shape[0]} does not split over "
                        f"{self.batch_shards} batch shards."
                    )
                return self.pack(value, self.batch_layout(rank))
            return self.pack(value, self.replicated(rank))

        return self._tf.nest.map_structure(pack, data)

    def _function(self, model, step):
        """A Keras train/test/predict function running `step` on the mesh."""
        tf = self._tf
        # Not reduce_retracing: DTensor's layout propagation needs the
        # static shapes of each batch size.
        compiled = tf.function(step)
        concatenate_outputs = step == model.predict_step

        traced = []

        def function(iterator):
            # Variables Keras creates lazily (optimizer, metrics) join the
            # mesh before the first trace; later calls reuse that trace.
            if not traced:
                self._place_remaining(
                    list(model.optimizer.variables) + list(model.metrics_variables)
                )
                traced.append(True)
            outputs = []
            for _, data in zip(range(model.steps_per_execution), iterator):
                with self._dtensor.default_mesh(self.mesh):
                    result = compiled(self._pack_batch(data))
                outputs.append(tf.nest.map_structure(self.to_numpy, result))
            if not outputs:
                raise StopIteration
            if concatenate_outputs:
                # Host tensors, as Keras' predict loop expects (it calls
                # `.numpy()` on them).
                return tf.nest.map_structure(
                    lambda *parts: tf.concat(parts, axis=0), *outputs
                )
            return outputs[-1]

        return function


def jax_model_parallel(model_axis="model", batch_axis="batch", devices=None,
                       expert_shards=None):
    """A `keras.distribution.ModelParallel` that shards experts (JAX).

    The device mesh is `batch x model`; every MoE weight's expert axis (the
    first axis of each weight in `layers.EXPERT_WEIGHT_RANKS`: the MLP
    experts' kernels and biases, the gated experts' kernels) is sharded over
    `model_axis`, everything else is replicated, and batches are split over
    `batch_axis` (data parallel). Use it before building the model:

    ```python
    keras.distribution.set_distribution(jax_model_parallel())
    model = build_model(); model.compile(...); model.fit(...)
    ```

    Args:
        model_axis, batch_axis: mesh axis names.
        devices: device list (default: `keras.distribution.list_devices()`).
        expert_shards: devices on the model axis (default: all of them).
    """
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras.distribution shards variables on the JAX backend only; on "
            "TensorFlow use keras_moe.expert_parallel.ExpertParallel."
        )
    distribution = keras.distribution
    devices = devices or distribution.list_devices()
    expert_shards = expert_shards or len(devices)
    if len(devices) % expert_shards:
        raise ValueError(
            f"{len(devices)} devices do not split into {expert_shards} expert shards."
        )
    mesh = distribution.DeviceMesh(
        shape=(len(devices) // expert_shards, expert_shards),
        axis_names=(batch_axis, model_axis),
        devices=devices,
    )
    layout_map = distribution.LayoutMap(mesh)
    for name, rank in moe_layers.EXPERT_WEIGHT_RANKS.items():
        layout_map[f".*{name}"] = (model_axis,) + (None,) * (rank - 1)
    return distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)


# Several hosts ---------------------------------------------------------------

COORDINATOR_VARIABLE = "KERAS_MOE_COORDINATOR_ADDRESS"
NUM_PROCESSES_VARIABLE = "KERAS_MOE_NUM_PROCESSES"
PROCESS_ID_VARIABLE = "KERAS_MOE_PROCESS_ID"


def cluster_from_environment(environ=None):
    """This host's place in the cluster, from its environment.

    Either the three variables `KERAS_MOE_COORDINATOR_ADDRESS` (`host:port`
    of process 0's coordinator), `KERAS_MOE_NUM_PROCESSES` and
    `KERAS_MOE_PROCESS_ID`, or a `TF_CONFIG` (`{"cluster": {"worker":
    [addresses]}, "task": {"type": "worker", "index": i}}`), whose first
    worker's address becomes the coordinator's.

    Args:
        environ: mapping to read (default `os.environ`).

    Returns:
        `(coordinator_address, num_processes, process_id)`, or None when
        neither is set (one process).
    """
    import json
    import os

    environ = os.environ if environ is None else environ
    if COORDINATOR_VARIABLE in environ:
        try:
            num_processes = int(environ[NUM_PROCESSES_VARIABLE])
            process_id = int(environ[PROCESS_ID_VARIABLE])
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"{COORDINATOR_VARIABLE} is set, so {NUM_PROCESSES_VARIABLE} "
                f"and {PROCESS_ID_VARIABLE} must be integers too."
            ) from error
        cluster = (environ[COORDINATOR_VARIABLE], num_processes, process_id)
    elif environ.get("TF_CONFIG"):
        config = json.loads(environ["TF_CONFIG"])
        workers = config.get("cluster", {}).get("worker", [])
        task = config.get("task", {})
        if not workers or task.get("type", "worker") != "worker":
            raise ValueError(
                "TF_CONFIG must list the workers (cluster.worker) and give "
                f"this task as a worker. Received: {environ['TF_CONFIG']}"
            )
        cluster = (workers[0], len(workers), int(task.get("index", 0)))
    else:
        return None
    if not 0 <= cluster[2] < cluster[1]:
        raise ValueError(
            f"Process id {cluster[2]} is outside the cluster's "
            f"{cluster[1]} processes."
        )
    return cluster


def jax_cluster_model_parallel(expert_shards=None, environ=None, **kwargs):
    """Joins the cluster this host belongs to and shards experts over all
    of its devices (JAX): the same script runs on every host.

    Reads the cluster with `cluster_from_environment`, starts JAX's
    distributed runtime (`keras.distribution.initialize`: one coordinator,
    every process's devices in one global list) and returns
    `jax_model_parallel` over the global devices, the expert axis spanning
    the hosts. Without a cluster in the environment it is
    `jax_model_parallel` on this process's devices.

    Data: each process passes its share of every global batch to `fit`
    (Keras does not split arrays across processes). With the default mesh,
    every device on the expert axis, that share is the whole batch, the
    same on every process; with `expert_shards` smaller than the device
    count the batch axis spans the processes and each passes its own
    `1 / num_processes` of the batch.

    ```python
    # on every host, e.g. with TF_CONFIG set per host
    keras.distribution.set_distribution(jax_cluster_model_parallel())
    model = build_model(); model.compile(...); model.fit(x, y)
    ```

    Args:
        expert_shards: devices on the expert axis (default: all devices
            of all processes).
        environ: mapping read for the cluster (default `os.environ`).
        **kwargs: passed to `jax_model_parallel` (axis names).

    Returns:
        `keras.distribution.ModelParallel`.
    """
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "jax_cluster_model_parallel needs the JAX backend; on TensorFlow "
            "see the README's 'Several hosts'."
        )
    cluster = cluster_from_environment(environ)
    if cluster is not None:
        import jax

        if not jax.distributed.is_initialized():
            address, num_processes, process_id = cluster
            keras.distribution.initialize(
                address, num_processes=num_processes, process_id=process_id
            )
    distribution = jax_model_parallel(expert_shards=expert_shards, **kwargs)
    if cluster is not None:
        # Each process feeds its share of the batch itself (see above).
        distribution.auto_shard_dataset = False
    return distribution


def initialize_dtensor_cluster(environ=None, device_type="CPU",
                               num_cpu_devices=None):
    """Joins the cluster this host belongs to as a DTensor client
    (TensorFlow): the same script runs on every host.

    Reads the cluster with `cluster_from_environment` (the coordinator's
    address is not needed: every client's address is; with `TF_CONFIG` they
    are its workers, with the `KERAS_MOE_*` variables this is refused),
    sets `DTENSOR_CLIENT_ID`, `DTENSOR_NUM_CLIENTS`, `DTENSOR_JOB_NAME` and
    `DTENSOR_JOBS`, and calls `dtensor.initialize_accelerator_system`.
    Call it first, before TensorFlow runs anything (DTensor refuses an
    initialised TensorFlow); `ExpertParallel` then builds its mesh over
    every client's devices.

    Args:
        environ: mapping read for the cluster (default `os.environ`).
        device_type: "CPU" or "GPU".
        num_cpu_devices: optional int, the logical CPU devices of this
            client (CPU clusters; `distribution.use_virtual_cpu_devices`
            would initialise TensorFlow too early).

    Returns:
        the number of clients (1 without a cluster, where nothing is done).
    """
    import json
    import os

    from tensorflow.experimental import dtensor

    import tensorflow as tf

    environ = os.environ if environ is None else environ
    cluster = cluster_from_environment(environ)
    if num_cpu_devices:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices,
        )
    if cluster is None:
        return 1
    if not environ.get("TF_CONFIG"):
        raise ValueError(
            "A DTensor cluster needs every client's address: describe it "
            "with TF_CONFIG (cluster.worker), not KERAS_MOE_COORDINATOR_ADDRESS."
        )
    workers = json.loads(environ["TF_CONFIG"])["cluster"]["worker"]
    os.environ.update({
        "DTENSOR_CLIENT_ID": str(cluster[2]),
        "DTENSOR_NUM_CLIENTS": str(cluster[1]),
        "DTENSOR_JOB_NAME": "worker",
        "DTENSOR_JOBS": ",".join(workers),
    })
    dtensor.initialize_accelerator_system(device_type)
    return cluster[1]
