"""Bytes on the wire per client per round vs the size of phi_g (and of phi_k: none), per PEFT variant.

The ClientApp's handlers are called in this process on real messages (as
tests/test_apps.py does: ``client_app.app.train / personalize / evaluate`` with
a TaskIdentity set), and their replies are serialised with Flower's own code
(flwr 1.41):

- "objects": the inflatable-object API Flower 1.41 uses to push a message: the
  sum of ``deflate()`` over the message and all its nested objects
  (RecordDict, ArrayRecord, Array, ArrayChunk, MetricRecord, ...), i.e. what
  the SuperNode uploads (object ids and headers included, gRPC framing not;
  objects with equal content share an id and are counted once, as Flower sends
  them once: e.g. LoRA's B = 0 matrices of the initial phi_g in the downlink);
- "proto": ``flwr.common.serde.message_to_proto(msg).SerializeToString()``,
  the whole message as one protobuf.

The ratio is reply bytes / raw bytes of phi_g's tensors (target <= 1.05x for a
Stage-1 reply). The overhead is nearly constant per reply (keys, shapes, metrics,
object headers), so the script also prices the same reply with a phi_g of the
shapes it has on the paper's CLIP ViT-B/16 (random values, same serialisation).
phi_k's bytes are searched for in every serialised reply (target: 0
occurrences). The downlink (server -> client, phi_g + instruction) is
printed for information.

    python bench/wire_bytes.py [--variants prompt,adapter,lora]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.serde import message_to_proto  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from common import model, run_cfg  # noqa: E402

from client_app import app as client  # noqa: E402
from fedpurel_app import protocol  # noqa: E402
from fedpurel_app.client import PHI_K  # noqa: E402
from fedpurel_app.protocol import PERSONALIZE, Instruction  # noqa: E402

RUN = {"train.rounds": 2, "personalize.rounds": 1, "train.local-epochs": 1, "data.client-test-size": 30}


def object_bytes(msg: Message) -> tuple[int, bytes]:
    objects = get_all_nested_objects(msg)
    blobs = [obj.deflate() for obj in objects.values()]
    return sum(len(b) for b in blobs), b"".join(blobs)


def proto_bytes(msg: Message) -> bytes:
    return message_to_proto(msg).SerializeToString()


def raw_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def server_message(phi_g: dict, message_type: str, server_round: int) -> Message:
    content = RecordDict(
        {protocol.ARRAYS: ArrayRecord(phi_g), protocol.CONFIG: ConfigRecord(Instruction(server_round).to_config())}
    )
    return Message(content, dst_node_id=100, message_type=message_type)


def contains(blob: bytes, state: dict) -> int:
    """Occurrences of any phi_k tensor's raw bytes (or a 64-byte window of it) in blob."""
    hits = 0
    for tensor in state.values():
        raw = tensor.detach().cpu().numpy().astype(np.float32).tobytes()
        hits += blob.count(raw) + (blob.count(raw[:64]) if len(raw) > 64 else 0)
    return hits


# phi_g of the paper's model, CLIP ViT-B/16 (text width 512, vision width 768, 12 blocks):
# a 16-token CoOp context, FedCLIP's adapter on the 512-d embedding, LoRA r = 8 on q/k/v.
PAPER_PHI_G = {
    "prompt": {"ctx": (16, 512)},
    "adapter": {"fc1.weight": (512, 512), "fc1.bias": (512,), "fc2.weight": (512, 512), "fc2.bias": (512,)},
    "lora": {
        f"blocks.{b}.attn.{m}.lora_{ab}.weight": ((8, 768) if ab == "A" else (768, 8))
        for b in range(12)
        for m in ("q_proj", "k_proj", "v_proj")
        for ab in ("A", "B")
    },
}


def paper_size_uplink(train_reply: Message, variant: str) -> tuple[int, int]:
    """(raw phi_g bytes, reply object bytes) of the same train reply with phi_g of the paper's shapes."""
    g = torch.Generator().manual_seed(0)
    phi_g = {k: torch.randn(shape, generator=g) for k, shape in PAPER_PHI_G[variant].items()}
    metrics = train_reply.content[protocol.METRICS]
    reply = Message(RecordDict({protocol.ARRAYS: ArrayRecord(phi_g), protocol.METRICS: metrics}), reply_to=train_reply)
    return raw_bytes(phi_g), object_bytes(reply)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="prompt,adapter,lora")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    print(
        f"config: embedded default with {RUN}, client 0 of 4; flwr serialisation: deflated objects "
        "(what 1.41 pushes) and message_to_proto"
    )
    for variant in args.variants.split(","):
        run = {**RUN, "peft.name": variant}
        phi_g = model(run_cfg(run))[1].global_state()
        context = Context(
            run_id=1,
            node_id=100,
            node_config={"partition-id": 0, "num-partitions": 4},
            state=RecordDict(),
            run_config=run,
        )
        down = server_message(phi_g, MessageType.TRAIN, 2)
        personalize = client.personalize(server_message(phi_g, PERSONALIZE, 1), context)
        phi_k = context.state.array_records[client.ContextMemory.PREFIX + PHI_K].to_torch_state_dict()
        train = client.train(down, context)
        evaluate = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2), context)
        for reply in (personalize, train, evaluate):
            if reply.has_error():
                raise SystemExit(f"the ClientApp replied with an error: {reply.error.reason}")
        raw = raw_bytes(phi_g)
        print(
            f"{variant}: phi_g {raw} B raw ({sum(t.numel() for t in phi_g.values())} float32 in "
            f"{len(phi_g)} tensors); phi_k {raw_bytes(phi_k)} B raw, stays on the client"
        )
        n_down, _ = object_bytes(down)
        print(
            f"  downlink train request     objects {n_down:>7d} B ({n_down / raw:.3f}x phi_g) | "
            f"proto {len(proto_bytes(down)):>7d} B"
        )
        for label, reply in (
            ("train reply (Stage 1)", train),
            ("personalize reply", personalize),
            ("evaluate reply", evaluate),
        ):
            n_obj, blob = object_bytes(reply)
            proto = proto_bytes(reply)
            hits = contains(blob + proto, phi_k)
            ratio = f"{n_obj / raw:.3f}x phi_g" if label.startswith("train") else "metrics only"
            print(
                f"  {label:26s} objects {n_obj:>7d} B ({ratio}) | proto {len(proto):>7d} B "
                f"({len(proto) / raw:.3f}x) | phi_k bytes found: {hits}"
            )
        n_train, _ = object_bytes(train)
        print(
            f"  => Stage-1 uplink per client per round: {n_train} B = {n_train / raw:.3f}x phi_g "
            f"(target <= 1.05x), overhead {n_train - raw} B; phi_k on the wire: 0 B",
            flush=True,
        )
        paper_raw, paper_obj = paper_size_uplink(train, variant)
        print(
            f"  => same reply with phi_g of CLIP ViT-B/16's shapes ({paper_raw} B raw): {paper_obj} B = "
            f"{paper_obj / paper_raw:.4f}x phi_g, overhead {paper_obj - paper_raw} B",
            flush=True,
        )


if __name__ == "__main__":
    main()
