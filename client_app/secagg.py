"""The client's side of a SecAgg+ round (``secagg.enabled``; the server's is ``server_app/secagg.py``).

SecAgg+'s four stages all arrive as ``train`` messages carrying Flower's
``secaggplus_configs`` record, so :func:`secagg_or_dp`, the mod in front of
the ``train`` handler, routes them through Flower's ``secaggplus_mod`` and lets
every other Stage-1 message go to the DP clipping as before. In the stage that
trains, :func:`_legacy_train` turns Flower's legacy content into our Stage-1
message, runs the handler (with the DP clipping of Flower's ``fixedclipping_mod``
in a DP run), checks the update (:func:`fedpurel_app.protocol.update_problem`:
the server cannot, once it is masked) and replies it as legacy content:
the update phi_g^k - phi_g, weighted by :func:`fedpurel_app.protocol.secagg_weight`,
with the round's metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedpurel_app import protocol
from fedpurel_app.protocol import Instruction

FITINS_CONFIG, FITINS_PARAMETERS = "fitins.config", "fitins.parameters"  # compat.fitins_to_recorddict's records
Handler = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Handler], Message]


class _Refused(Exception):
    """The handler's reply is an error: it goes back as it is, around secaggplus_mod."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_or_dp(dp_clipping: Mod) -> Mod:
    """The ``train`` handler's mod: a SecAgg+ stage through ``secaggplus_mod``, any other Stage-1
    message through ``dp_clipping``."""

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return dp_clipping(msg, context, call_next)
        try:
            return secaggplus_mod(msg, context, lambda m, c: _legacy_train(m, c, dp_clipping, call_next))
        except _Refused as refused:
            return Message(refused.reply.error, reply_to=msg)

    return mod


def _legacy_train(msg: Message, context: Context, dp_clipping: Mod, call_next: Handler) -> Message:
    """SecAgg+'s training stage: legacy ``fitins`` in, our handler, the checked update as ``fitres`` out."""
    # The records themselves: Flower's recorddict_to_fitins refuses the list values of our instruction.
    config = dict(msg.content.config_records[FITINS_CONFIG])
    try:
        instruction = Instruction.read(config)
        if instruction.secagg_names is None or instruction.secagg_range is None:
            raise protocol.ProtocolError(f"a SecAgg+ round's instruction lacks '{protocol.SECAGG_NAMES}'")
        names = instruction.secagg_names
        phi_g = protocol.named(
            parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content[FITINS_PARAMETERS], True)), names
        )
    except protocol.ProtocolError as err:
        raise _Refused(Message(Error(protocol.USER_ERROR, f"ProtocolError: {err}"), reply_to=msg)) from err
    # The incoming message with our content (a new Message would need the run's identity, which a
    # simulation's ClientApp does not have): the same metadata, a message of type train.
    ours = copy.copy(msg)
    ours.content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in phi_g.items()}),
            protocol.CONFIG: ConfigRecord(config),
        }
    )
    out = dp_clipping(ours, context, call_next)
    if out.has_error():
        raise _Refused(out)
    mine = {k: v.numpy() for k, v in out.content[protocol.ARRAYS].items()}
    metrics = dict(out.content[protocol.METRICS])
    update = {k: mine[k].astype(np.float64) - np.asarray(phi_g[k], dtype=np.float64) for k in names}
    problem = protocol.update_problem(update, instruction.secagg_range)
    if problem is not None:
        raise _Refused(Message(Error(protocol.USER_ERROR, f"SecAggError: this client {problem}"), reply_to=msg))
    weight = protocol.secagg_weight(instruction, int(metrics["num-examples"]))
    parameters = ndarrays_to_parameters(protocol.ordered(update, names))
    fitres = FitRes(Status(Code.OK, ""), parameters, weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, True), reply_to=msg)
