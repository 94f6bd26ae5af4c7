"""FedPuReL ClientApp: unpack a message, call the library, pack the reply.

Private state lives in ``context.state`` and never enters a reply:

- ``fedpurel.phi_k``: the private residual branch phi_k (Stage 2); on a node
  with a ``state-dir`` in its node-config it is also saved there after every
  Stage-2 update (atomic, owner-only) and restored after a restart;
- ``fedpurel.features``: this client's labels and zero-shot logits and, for
  variants that consume image features (prompt, adapter), those features,
  all computed once with the frozen image encoder. Variants that consume
  pixels (lora) do not keep them there (a client's preprocessed images are
  far larger than its features for real image sizes): their pixels are
  recomputed from the dataset in every message, which costs one pass of
  CLIP's preprocessing and no encoder pass.

Handlers:

- ``train``               Stage 1: purified local update of phi_g; replies phi_g.
- ``train.personalize``   Stage 2: residual update of phi_k against the received
                          (frozen) phi_g; replies metrics only.
- ``evaluate``            PM evaluation on the client's own test set.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedpurel_app import task
from fedpurel_app.config import RunConfig, parse_node_config, parse_run_config
from fedpurel_app.peft import PeftVariant
from fedpurel_app.state import NodeStateStore, StateError, run_state_key
from fedpurel_app.training import FeatureSet, predict, seeded_generator, train_global, train_private

PHI_K = "fedpurel.phi_k"
FEATURES = "fedpurel.features"
FEATURES_KEY = "fedpurel.features-key"

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the validated node-config."""
    node = parse_node_config(context.node_config)
    return node.partition_id, node.num_partitions


def _features(cfg: RunConfig, context: Context) -> tuple[FeatureSet, FeatureSet]:
    """This client's (train, test) feature sets; what is cached lives in context.state."""
    pid, num = _partition(context)
    kind = task.input_kind(cfg)
    key = repr((cfg.dataset, cfg.data_root, cfg.model, cfg.pretrained, cfg.seed, cfg.n_max,
                cfg.imbalance_factor, cfg.dirichlet_alpha, cfg.min_client_samples,
                cfg.client_test_size, pid, num, kind))
    cached_fields = ("labels", "zero_shot_logits") + (("features",) if kind == "features" else ())
    cached = context.state.config_records.get(FEATURES_KEY)
    if cached is not None and cached["key"] == key and FEATURES in context.state.array_records:
        arrays = context.state.array_records[FEATURES].to_torch_state_dict()
        device = task.load_clip(cfg).device
        inputs = (
            (arrays["train.features"], arrays["test.features"]) if kind == "features"
            else task.client_inputs(cfg, pid, num)
        )
        return tuple(
            FeatureSet(
                x.to(device), arrays[f"{split}.labels"].to(device), arrays[f"{split}.zero_shot_logits"].to(device)
            )
            for split, x in zip(("train", "test"), inputs, strict=True)
        )
    train, test = task.client_feature_sets(cfg, pid, num)
    state = {
        f"{split}.{field}": getattr(data, field).cpu()
        for split, data in (("train", train), ("test", test))
        for field in cached_fields
    }
    context.state[FEATURES] = ArrayRecord(state)
    context.state[FEATURES_KEY] = ConfigRecord({"key": key})
    return train, test


def _model(cfg: RunConfig, msg: Message, context: Context) -> PeftVariant:
    """The PEFT model with the received phi_g and this client's own phi_k."""
    peft = task.build_model(cfg)
    peft.load_global_state(msg.content["arrays"].to_torch_state_dict())
    if PHI_K in context.state.array_records:
        peft.load_private_state(context.state.array_records[PHI_K].to_torch_state_dict())
    return peft


def _store(cfg: RunConfig, context: Context) -> NodeStateStore | None:
    """The node's durable private state folder (node-config ``state-dir``), if it has one."""
    if not context.node_config.get("state-dir"):
        return None
    return NodeStateStore(str(context.node_config["state-dir"]), run_state_key(cfg, *_partition(context)))


def _restore_phi_k(cfg: RunConfig, context: Context) -> None:
    """After a SuperNode restart, continue with the phi_k saved in its state-dir.

    A file written under another run config (or damaged) is not loaded: the
    client starts Stage 2 afresh and overwrites it at its next save.
    """
    store = _store(cfg, context)
    if store is None or PHI_K in context.state.array_records:
        return
    try:
        saved = store.load("phi_k")
    except StateError as err:
        log(WARNING, "Ignoring the saved private state: %s", err)
        return
    if saved is not None:
        context.state[PHI_K] = ArrayRecord(saved)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, PeftVariant, FeatureSet, FeatureSet, int, int]:
    cfg = parse_run_config(context.run_config)
    _restore_phi_k(cfg, context)
    train, test = _features(cfg, context)
    server_round = int(msg.content["config"]["server-round"])
    pid, _ = _partition(context)
    return cfg, _model(cfg, msg, context), train, test, server_round, pid


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Stage 1: purified local epochs on phi_g; reply with phi_g only."""
    cfg, peft, data, _, server_round, pid = _setup(msg, context)
    stats = train_global(
        peft, data, task.stage1_options(cfg), cfg.local_epochs, cfg.batch_size,
        seeded_generator(cfg.seed, 1, server_round, pid),
    )
    metrics = MetricRecord({"num-examples": len(data), **stats.means()})
    return Message(
        RecordDict({"arrays": ArrayRecord(peft.global_state()), "metrics": metrics}), reply_to=msg
    )


@app.train("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Stage 2: train the private residual phi_k against the received phi_g."""
    cfg, peft, data, _, server_round, pid = _setup(msg, context)
    loss = train_private(
        peft, data, cfg.lam, cfg.personal_lr, cfg.personal_epochs, cfg.batch_size,
        seeded_generator(cfg.seed, 2, server_round, pid), task.precision(cfg),
    )
    context.state[PHI_K] = ArrayRecord(peft.private_state())
    if (store := _store(cfg, context)) is not None:
        store.save("phi_k", peft.private_state())
    metrics = MetricRecord({"num-examples": len(data), "residual-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """PM evaluation on the client's test set: predictions of l_G + l_P, l_G and z.

    Replies the predictions and labels (integers) so that the server can pool
    Many / Medium / Few over clients; no parameters.
    """
    cfg, peft, _, test, _, _ = _setup(msg, context)
    personalized = PHI_K in context.state.array_records
    precision = task.precision(cfg)
    metrics = MetricRecord(
        {
            "num-examples": len(test),
            "personalized": int(personalized),
            "labels": test.labels.tolist(),
            "pm-preds": predict(peft, test.features, personalized, precision).tolist(),
            "gm-preds": predict(peft, test.features, False, precision).tolist(),
            "zs-preds": test.zero_shot_logits.argmax(dim=-1).tolist(),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

