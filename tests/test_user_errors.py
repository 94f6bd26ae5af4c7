"""A user's mistake ends the run with one message and no traceback; a bug keeps its traceback."""

from __future__ import annotations

import logging
import sys

import pytest
from flwr.app import Context, RecordDict

from fedpurel_app import errors
from fedpurel_app.checkpoint import CheckpointError
from fedpurel_app.data.cifar import CifarNotFoundError
from fedpurel_app.data.local import NodeDataError
from fedpurel_app.models import ModelLoadError
from fedpurel_app.state import StateError
from server_app import app as server
from tests.conftest import SMALL_RUN


@pytest.mark.parametrize(
    "error",
    [
        errors.ConfigError,
        errors.NodeConfigError,
        ModelLoadError,
        CifarNotFoundError,
        NodeDataError,
        CheckpointError,
        StateError,
        errors.ClientError,
    ],
)
def test_every_mistake_a_user_can_make_is_a_user_error(error):
    assert issubclass(error, errors.UserError)


def flwr_record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:  # noqa: BLE001
        info = sys.exc_info()
    return logging.LogRecord("flwr", logging.ERROR, __file__, 1, "%s raised an exception", ("ServerApp",), info)


def test_flowers_log_of_a_user_error_keeps_its_line_and_drops_the_traceback():
    record = flwr_record(CifarNotFoundError("dataset 'cifar10-lt': not found in /tmp/nope"))
    assert server._UserErrorsWithoutTraceback().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == "ServerApp raised an exception (see the FedPuReL message above)"


def test_any_other_exception_keeps_its_traceback():
    record = flwr_record(RuntimeError("a bug"))
    server._UserErrorsWithoutTraceback().filter(record)
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    ("overrides", "error", "says"),
    [
        ({"data.name": "cifar10-lt", "data.root": "/tmp/nope"}, CifarNotFoundError, "not found in /tmp/nope"),
        ({"data.name": "imagenet-lt", "data.root": "/tmp"}, errors.DataError, "split file"),
        ({"train.rounds": 0}, errors.ConfigError, "train.rounds"),
        ({"model.pretrained": "/tmp/nope.safetensors"}, ModelLoadError, "checkpoint file not found"),
        ({"resume-from": "/tmp/nope"}, CheckpointError, "cannot resume"),
    ],
)
def test_the_server_app_stops_on_a_user_error_with_one_message(overrides, error, says, caplog, tmp_path):
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**SMALL_RUN, "output-dir": str(tmp_path), **overrides},
    )
    with caplog.at_level(logging.ERROR), pytest.raises(error, match=says):
        server.main(None, context)
    stopped = [r for r in caplog.records if r.getMessage().startswith("FedPuReL run stopped:")]
    assert len(stopped) == 1 and says in stopped[0].getMessage()
    assert stopped[0].exc_info is None


def test_when_every_client_stops_on_its_own_user_error_the_run_stops_with_that_message(tmp_path, monkeypatch):
    from tests.fake_grid import DirectGrid, run_server, set_task_identity

    set_task_identity(monkeypatch)
    run = {**SMALL_RUN, "data.n-max": 400, "train.min-nodes": 2, "output-dir": str(tmp_path)}
    with pytest.raises(errors.ClientError, match="lower data.n-max"):
        run_server(run, DirectGrid(run, 2))
