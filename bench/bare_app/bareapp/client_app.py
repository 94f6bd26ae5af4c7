"""Bare ClientApp: the received ArrayRecord + 1, nothing else (numpy only, no torch)."""

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

ARRAYS = "arrays"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content[ARRAYS]
    plus_one = ArrayRecord({name: Array(array.numpy() + 1) for name, array in arrays.items()})
    return Message(RecordDict({ARRAYS: plus_one}), reply_to=msg)
