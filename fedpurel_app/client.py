"""What a client does with each message: Stage-1 training, personalization, evaluation.

The ClientApp unpacks a message into the run config, the node config, phi_g
and an :class:`~fedpurel_app.protocol.Instruction`, gives :class:`Client` a
:class:`Memory` (its ``context.state``), calls one method and packs the
reply it returns. The flow is one way: the node config gives the client's
data (:mod:`fedpurel_app.data.client`), the frozen CLIP turns it into inputs
(:mod:`fedpurel_app.inputs`), the method and the loops train on them
(:mod:`fedpurel_app.training`), the metrics count the results.

Private state (phi_k and a method's other private tensors) lives in the
node's memory for the run, and in its state folder, written after every
update (atomic, owner-only): the node-config ``state-dir``, or, on a node
without one (simulation), a folder of this run under the cache folder
(``<cache>/nodes/<run>/partition-<i>-of-<n>``). A node whose memory lost it
(a restarted SuperNode, a resumed simulation) restores it from there.
None of it ever enters a reply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from .config import NodeConfig, RunConfig, fingerprint
from .data.client import ClientData, client_data
from .errors import StateError
from .inputs import FeatureSet, client_feature_sets, clip_of, feature_cache_dir, variant_inputs
from .methods.base import Method, build_method
from .metrics import class_counts
from .models import default_cache_dir
from .peft.base import PeftVariant, build_peft, input_kind
from .protocol import EvaluateReply, Evaluation, Identity, Instruction, PersonalizeReply, TrainReply
from .state import NodeStateStore
from .training import predict, resolve_precision, seeded_generator, train_global

log = logging.getLogger(__name__)

PHI_K = "phi_k"
METHOD_STATE = "method-state"
FEATURES = "features-"  # + the fingerprint of what they mean


class Memory(Protocol):
    """A node's state for the run (Flower's ``context.state``): named tensor dicts."""

    def get(self, name: str) -> dict[str, torch.Tensor] | None: ...

    def put(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def drop(self, name: str) -> None: ...

    def names(self) -> Iterable[str]: ...


class DictMemory(dict):
    """A :class:`Memory` in a plain dict: a node's state in an in-process loop or a test."""

    def put(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self[name] = {key: value.detach().cpu().clone() for key, value in tensors.items()}

    def drop(self, name: str) -> None:
        self.pop(name, None)

    def names(self) -> Iterable[str]:
        return list(self)


def node_state_dir(cfg: RunConfig, node: NodeConfig, run: str) -> str:
    """The node's state folder: its ``state-dir``, else this run's folder for it in the cache
    ('' when neither is known)."""
    if node.state_dir:
        return node.state_dir
    if not run:
        return ""
    cache = Path(cfg.model.cache_dir).expanduser() if cfg.model.cache_dir else default_cache_dir()
    return str(cache / "nodes" / run / f"partition-{node.partition_id}-of-{node.num_partitions}")


class Client:
    """One client answering one message."""

    def __init__(self, cfg: RunConfig, node: NodeConfig, memory: Memory, instruction: Instruction) -> None:
        self.cfg, self.node, self.memory, self.instruction = cfg, node, memory, instruction
        self.store = self._store()
        self.restored = self._restore()
        self.clip = clip_of(cfg.model, cfg.data)
        self.kind = input_kind(cfg.peft.name)
        self.precision = resolve_precision(cfg.model.precision, self.clip.device)
        self.data = client_data(cfg.data, cfg.seed, node)
        self.train_set, self.test_set = self._feature_sets()

    # --- private state -------------------------------------------------------------------

    def _store(self) -> NodeStateStore | None:
        folder = node_state_dir(self.cfg, self.node, self.instruction.run)
        if not folder:
            return None
        node = self.node
        key = fingerprint(
            self.cfg,
            "state",
            partition_id=node.partition_id,
            num_partitions=node.num_partitions,
            data_dir=node.data_dir,
        )
        return NodeStateStore(folder, key)

    def _restore(self) -> bool:
        """Load what the memory lacks from the state folder; True when phi_k was restored.

        A file written under another config (or damaged) is not loaded: the client starts
        that part afresh and overwrites the file at its next save.
        """
        restored = False
        if self.store is None:
            return False
        have = set(self.memory.names())
        for name in (PHI_K, METHOD_STATE):
            if name in have:
                continue
            try:
                saved = self.store.load(name)
            except StateError as err:
                log.warning("Ignoring the saved private state: %s", err)
                continue
            if saved is not None:
                self.memory.put(name, saved)
                restored = restored or name == PHI_K
        return restored

    def _keep(self, peft: PeftVariant, method: Method, phi_k: bool) -> None:
        """Keep the method's private tensors and, when ``phi_k`` (it was trained), phi_k in the
        node's memory and its state folder. A node holding phi_k is personalized."""
        if phi_k:
            state = peft.private_state()
            self.memory.put(PHI_K, state)
            if self.store is not None:
                self.store.save(PHI_K, state)
        if extra := method.private_state():
            self.memory.put(METHOD_STATE, extra)
            if self.store is not None:
                self.store.save(METHOD_STATE, extra)

    @property
    def personalized(self) -> bool:
        return PHI_K in set(self.memory.names())

    # --- inputs ----------------------------------------------------------------------------

    def _feature_sets(self) -> tuple[FeatureSet, FeatureSet]:
        """This client's (train, test) feature sets, kept in its memory for the run.

        Labels and zero-shot logits are kept, and the image features for variants that
        consume them; a variant that consumes pixels gets them through CLIP's
        preprocessing in every message (a client's preprocessed images are far larger
        than its features at real image sizes).
        """
        node = self.node
        key = fingerprint(
            self.cfg,
            "features",
            inputs=self.kind,
            partition_id=node.partition_id,
            num_partitions=node.num_partitions,
            data_dir=node.data_dir,
        )["key"]
        name = FEATURES + key
        kept = self.memory.get(name)
        device = self.clip.device
        if kept is not None:
            if self.kind == "features":
                inputs = (kept["train.features"], kept["test.features"])
            else:
                inputs = (
                    variant_inputs(self.clip, self.kind, self.data.train),
                    variant_inputs(self.clip, self.kind, self.data.test),
                )
            return tuple(  # type: ignore[return-value]
                FeatureSet(
                    x.to(device), kept[f"{split}.labels"].to(device), kept[f"{split}.zero_shot_logits"].to(device)
                )
                for split, x in zip(("train", "test"), inputs, strict=True)
            )
        train, test = client_feature_sets(self.clip, self.kind, self.data, self._cache_dir())
        fields = ("labels", "zero_shot_logits") + (("features",) if self.kind == "features" else ())
        for old in [n for n in self.memory.names() if n.startswith(FEATURES)]:
            self.memory.drop(old)
        self.memory.put(
            name,
            {f"{split}.{f}": getattr(s, f).cpu() for split, s in (("train", train), ("test", test)) for f in fields},
        )
        return train, test

    def _cache_dir(self) -> str | None:
        """A node with a state-dir keeps its feature cache there; others use the run's cache folder."""
        return feature_cache_dir(self.cfg.model, self.node.state_dir)

    # --- the model -------------------------------------------------------------------------

    def model(self, phi_g: Mapping[str, torch.Tensor]) -> tuple[PeftVariant, Method]:
        """The PEFT model with the received phi_g and this client's own phi_k, and the run's
        method with its private state (and the global class counts when the message has them)."""
        peft = build_peft(self.cfg, self.clip, self.data.classnames, self.data.template)
        peft.load_global_state(phi_g)
        counts = self.instruction.class_counts
        method = build_method(self.cfg, None if counts is None else list(counts))
        if (phi_k := self.memory.get(PHI_K)) is not None:
            peft.load_private_state(phi_k)
        if (extra := self.memory.get(METHOD_STATE)) is not None:
            method.load_private_state(extra)
        return peft, method

    def _generator(self, stage: int) -> torch.Generator:
        return seeded_generator(self.cfg.seed, stage, self.instruction.server_round, self.node.partition_id)

    # --- the messages ----------------------------------------------------------------------

    def identity(self) -> Identity:
        return Identity(self.node.partition_id)

    def train(self, phi_g: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], TrainReply]:
        """Stage 1: the method's (purified) local epochs on phi_g; returns phi_g and the reply."""
        cfg = self.cfg
        peft, method = self.model(phi_g)
        stats = train_global(
            peft,
            self.train_set,
            method.stage1_options(self.precision),
            cfg.train.local_epochs,
            cfg.train.batch_size,
            self._generator(1),
            method,
        )
        self._keep(peft, method, phi_k=method.stage1_trains_private)
        return peft.global_state(), TrainReply(len(self.train_set), self.node.partition_id, stats.means())

    def personalize(self, phi_g: Mapping[str, torch.Tensor]) -> PersonalizeReply:
        """Stage 2: the method's personalization of phi_k against the received, frozen phi_g;
        with ``evaluate`` in the instruction, the reply also carries the evaluation of the
        just-personalized model."""
        peft, method = self.model(phi_g)
        first = not self.personalized
        loss = method.personalize(peft, self.train_set, self._generator(2), first=first, precision=self.precision)
        self._keep(peft, method, phi_k=True)
        evaluation = self._evaluation(peft, method, personalized=True) if self.instruction.evaluate else None
        return PersonalizeReply(len(self.train_set), self.node.partition_id, loss, self.restored, evaluation)

    def evaluate(self, phi_g: Mapping[str, torch.Tensor]) -> EvaluateReply:
        """PM evaluation on the client's own test set."""
        peft, method = self.model(phi_g)
        return EvaluateReply(self.node.partition_id, self._evaluation(peft, method, self.personalized), self.restored)

    def _evaluation(self, peft: PeftVariant, method: Method, personalized: bool) -> Evaluation:
        """Per-class counts on the client's test set of the personalized model (l_G on a
        client without private parameters), of l_G and of z."""
        test, precision = self.test_set, self.precision
        num_classes = len(self.data.classnames)
        labels = test.labels.cpu().numpy()
        pm = predict(peft, test.features, personalized, precision, method.personal_logits).cpu().numpy()
        gm = predict(peft, test.features, False, precision).cpu().numpy()
        zs = test.zero_shot_logits.argmax(dim=-1).cpu().numpy()
        rows = [class_counts(p, labels, num_classes) for p in (pm, gm, zs)]
        return Evaluation(
            personalized,
            *(tuple(int(v) for v in correct) for correct, _ in rows),
            tuple(int(v) for v in rows[0][1]),
        )


__all__ = ["METHOD_STATE", "PHI_K", "Client", "ClientData", "DictMemory", "Memory", "node_state_dir"]
