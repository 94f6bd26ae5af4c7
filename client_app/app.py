"""FedPuReL ClientApp: unpack a message, call the library, pack the reply.

Private state lives in ``context.state`` and never enters a reply:

- ``fedpurel.phi_k``: the private branch phi_k (FedPuReL's residual, or a
  baseline's local copy) and ``fedpurel.method-state``: a method's other private
  tensors (a linear head, a controller's state); on a node with a ``state-dir``
  in its node-config both are also saved there after every update (atomic,
  owner-only) and restored after a restart;
- ``fedpurel.features``: this client's labels and zero-shot logits and, for
  variants that consume image features (prompt, adapter), those features,
  all computed once with the frozen image encoder. Variants that consume
  pixels (lora) do not keep them there (a client's preprocessed images are
  far larger than its features for real image sizes): their pixels are
  recomputed from the dataset in every message, which costs one pass of
  CLIP's preprocessing and no encoder pass.

The client's data is its node-config ``data-dir`` (its own image folder) when
set, else its ``partition-id`` of the run's Fed-LT split. A node with a
``state-dir`` keeps its feature cache there too. Train and evaluate replies
carry the node's ``partition-id`` so that the server samples in partition order.

Handlers:

- ``train``               Stage 1: the method's (purified) local update of phi_g;
                          replies phi_g.
- ``train.personalize``   Stage 2: the method's personalization of its private
                          parameters against the received (frozen) phi_g;
                          replies metrics only (with the PM evaluation when
                          the server asks for it in the same message).
- ``evaluate``            PM evaluation on the client's own test set.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedpurel_app import task
from fedpurel_app.config import NodeConfig, RunConfig, parse_node_config, parse_run_config
from fedpurel_app.methods import Method, build_method
from fedpurel_app.peft import PeftVariant
from fedpurel_app.state import NodeStateStore, StateError, run_state_key
from fedpurel_app.training import FeatureSet, predict, seeded_generator, train_global

PHI_K = "fedpurel.phi_k"
METHOD_STATE = "fedpurel.method-state"
FEATURES = "fedpurel.features"
FEATURES_KEY = "fedpurel.features-key"

app = ClientApp()


def _feature_cache_dir(node: NodeConfig) -> str:
    """A node with a state-dir keeps its feature cache there; others use the run's cache folder."""
    return str(Path(node.state_dir).expanduser() / "cache") if node.state_dir else ""


def _features(cfg: RunConfig, node: NodeConfig, context: Context) -> tuple[FeatureSet, FeatureSet]:
    """This client's (train, test) feature sets; what is cached lives in context.state."""
    pid, num, data_dir = node.partition_id, node.num_partitions, node.data_dir
    kind = task.input_kind(cfg)
    key = repr((cfg.dataset, cfg.data_root, cfg.model, cfg.pretrained, cfg.seed, cfg.n_max,
                cfg.imbalance_factor, cfg.dirichlet_alpha, cfg.min_client_samples,
                cfg.client_test_size, pid, num, kind, data_dir))
    cached_fields = ("labels", "zero_shot_logits") + (("features",) if kind == "features" else ())
    cached = context.state.config_records.get(FEATURES_KEY)
    if cached is not None and cached["key"] == key and FEATURES in context.state.array_records:
        arrays = context.state.array_records[FEATURES].to_torch_state_dict()
        device = task.load_clip(cfg).device
        inputs = (
            (arrays["train.features"], arrays["test.features"]) if kind == "features"
            else task.client_inputs(cfg, pid, num, data_dir)
        )
        return tuple(
            FeatureSet(
                x.to(device), arrays[f"{split}.labels"].to(device), arrays[f"{split}.zero_shot_logits"].to(device)
            )
            for split, x in zip(("train", "test"), inputs, strict=True)
        )
    train, test = task.client_feature_sets(cfg, pid, num, data_dir, _feature_cache_dir(node))
    state = {
        f"{split}.{field}": getattr(data, field).cpu()
        for split, data in (("train", train), ("test", test))
        for field in cached_fields
    }
    context.state[FEATURES] = ArrayRecord(state)
    context.state[FEATURES_KEY] = ConfigRecord({"key": key})
    return train, test


def _model(cfg: RunConfig, node: NodeConfig, msg: Message, context: Context) -> tuple[PeftVariant, Method]:
    """The PEFT model with the received phi_g and this client's own phi_k, and the run's method
    with its private state (and the global class counts when the message carries them)."""
    peft = task.build_model(cfg, node.data_dir)
    peft.load_global_state(msg.content["arrays"].to_torch_state_dict())
    counts = msg.content["config"].get("class-counts")
    method = build_method(cfg, None if counts is None else list(counts))
    if PHI_K in context.state.array_records:
        peft.load_private_state(context.state.array_records[PHI_K].to_torch_state_dict())
    if METHOD_STATE in context.state.array_records:
        method.load_private_state(context.state.array_records[METHOD_STATE].to_torch_state_dict())
    return peft, method


def _keep_private(
    cfg: RunConfig, node: NodeConfig, context: Context, peft: PeftVariant, method: Method, phi_k: bool
) -> None:
    """Keep the method's private tensors and, when ``phi_k`` (it was trained), phi_k in the
    node's state and its state-dir. A node holding phi_k is personalized."""
    store = _store(cfg, node)
    if phi_k:
        context.state[PHI_K] = ArrayRecord(peft.private_state())
        if store is not None:
            store.save("phi_k", peft.private_state())
    if extra := method.private_state():
        context.state[METHOD_STATE] = ArrayRecord(extra)
        if store is not None:
            store.save("method-state", extra)


def _store(cfg: RunConfig, node: NodeConfig) -> NodeStateStore | None:
    """The node's durable private state folder (node-config ``state-dir``), if it has one."""
    if not node.state_dir:
        return None
    return NodeStateStore(node.state_dir, run_state_key(cfg, node.partition_id, node.num_partitions, node.data_dir))


def _restore_private(cfg: RunConfig, node: NodeConfig, context: Context) -> None:
    """After a SuperNode restart, continue with the phi_k (and method state) saved in its state-dir.

    Only what the node's context.state lacks is read. A file written under
    another run config (or damaged) is not loaded: the client starts that part
    afresh and overwrites the file at its next save.
    """
    store = _store(cfg, node)
    if store is None:
        return
    for name, key in (("phi_k", PHI_K), ("method-state", METHOD_STATE)):
        if key in context.state.array_records:
            continue
        try:
            saved = store.load(name)
        except StateError as err:
            log(WARNING, "Ignoring the saved private state: %s", err)
            continue
        if saved is not None:
            context.state[key] = ArrayRecord(saved)
            log(INFO, "Restored this node's %s from its state-dir", name)


def _setup(msg: Message, context: Context):
    """(cfg, node, peft, method, train, test, server round) for one message; both configs
    are validated here, once."""
    cfg = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    _restore_private(cfg, node, context)
    train, test = _features(cfg, node, context)
    server_round = int(msg.content["config"]["server-round"])
    return cfg, node, *_model(cfg, node, msg, context), train, test, server_round


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Stage 1: the method's (purified) local epochs on phi_g; reply with phi_g only."""
    cfg, node, peft, method, data, _, server_round = _setup(msg, context)
    stats = train_global(
        peft, data, task.stage1_options(cfg), cfg.local_epochs, cfg.batch_size,
        seeded_generator(cfg.seed, 1, server_round, node.partition_id), method,
    )
    _keep_private(cfg, node, context, peft, method, phi_k=method.stage1_trains_private)
    metrics = MetricRecord({"num-examples": len(data), "partition-id": node.partition_id, **stats.means()})
    return Message(
        RecordDict({"arrays": ArrayRecord(peft.global_state()), "metrics": metrics}), reply_to=msg
    )


@app.train("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Stage 2: the method's personalization of phi_k against the received, frozen phi_g.

    When the message's config has ``evaluate`` set, the reply also carries the
    evaluation of the just-personalized model (as :func:`evaluate` would reply).
    """
    cfg, node, peft, method, data, test, server_round = _setup(msg, context)
    loss = method.personalize(
        peft, data, seeded_generator(cfg.seed, 2, server_round, node.partition_id),
        first=PHI_K not in context.state.array_records, precision=task.precision(cfg),
    )
    _keep_private(cfg, node, context, peft, method, phi_k=True)
    if msg.content["config"].get("evaluate"):
        metrics = _evaluation(cfg, node, peft, method, test, personalized=True)
        metrics["residual-loss"] = loss
    else:
        metrics = MetricRecord({"num-examples": len(data), "residual-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """PM evaluation on the client's test set (see :func:`_evaluation`); no parameters."""
    cfg, node, peft, method, _, test, _ = _setup(msg, context)
    metrics = _evaluation(cfg, node, peft, method, test, personalized=PHI_K in context.state.array_records)
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _evaluation(
    cfg: RunConfig, node: NodeConfig, peft: PeftVariant, method: Method, test: FeatureSet, personalized: bool
) -> MetricRecord:
    """Predictions on the client's test set of the personalized model (FedPuReL: l_G + l_P;
    l_G on a client without private parameters), of l_G and of z, with the labels.

    Predictions and labels are integers, so that the server can pool Many / Medium /
    Few over clients.
    """
    precision = task.precision(cfg)
    return MetricRecord(
        {
            "num-examples": len(test),
            "partition-id": node.partition_id,
            "personalized": int(personalized),
            "labels": test.labels.tolist(),
            "pm-preds": predict(peft, test.features, personalized, precision, method.personal_logits).tolist(),
            "gm-preds": predict(peft, test.features, False, precision).tolist(),
            "zs-preds": test.zero_shot_logits.argmax(dim=-1).tolist(),
        }
    )
