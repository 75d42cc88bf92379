"""The training job's reporting: a Redis that goes away for a while must not end hours of training."""

from __future__ import annotations

import logging

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cli.services import free_port
from core import records
from core.store import ArtifactStore
from trainer.tasks import _Reporter


def test_progress_reports_are_skipped_not_fatal_while_redis_is_unreachable(tmp_path, caplog, redis_client) -> None:
    dead = Redis(port=free_port(), retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    step = {"event": "step", "step": 1, "total_steps": 4, "epoch": 0.25, "lr": 1e-4, "metrics": {"loss": 0.69}}
    with caplog.at_level(logging.WARNING, logger="trainer.tasks"):
        _Reporter(dead, ArtifactStore(tmp_path), "tr_gone")(step)  # returns: the training goes on
    assert "training tr_gone: step not reported, Redis unreachable" in caplog.text

    # The same report reaches a Redis that answers.
    record = records.create(redis_client, records.TRAINING, {"id": "tr_here", "status": "running", "owner": "k"})
    _Reporter(redis_client, ArtifactStore(tmp_path), record["id"])(step)
    assert records.get(redis_client, records.TRAINING, "tr_here")["progress"]["step"] == 1
