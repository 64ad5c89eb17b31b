"""Shared fixtures: a real RabbitMQ exchange per test, and config files."""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

AMQP_URL = os.environ.get("PSPROBE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


@dataclass
class Delivered:
    routing_key: str
    message_id: str
    delivery_mode: int
    content_type: str
    body: dict


class Bus:
    """A fresh topic exchange with one queue bound to every key: what arrived, exactly."""

    def __init__(self) -> None:
        import pika

        self.exchange = f"test.psprobe.{uuid.uuid4().hex[:10]}"
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(self.exchange, exchange_type="topic", auto_delete=False)
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, self.exchange, routing_key="#")

    def drain(self) -> list[Delivered]:
        """Everything in the queue now. Confirmed publishes are already enqueued."""
        out = []
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return out
            out.append(Delivered(method.routing_key, props.message_id, props.delivery_mode,
                                 props.content_type, json.loads(body)))

    def close(self) -> None:
        try:
            self.ch.exchange_delete(self.exchange)
            self.conn.close()
        except Exception:
            pass


@pytest.fixture
def bus():
    b = Bus()
    yield b
    b.close()


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    """An INI file from {section: {key: value}}."""
    lines = []
    for section, kv in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(autouse=True)
def _psprobe_logging_to_caplog():
    """A CLI test may have routed the psprobe logger to a stream; give it back to caplog."""
    import logging

    lg = logging.getLogger("psprobe")
    lg.handlers[:] = []
    lg.propagate = True
    lg.setLevel(logging.DEBUG)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests that use the real broker are marked `broker`, so an offline build (%check) can skip them."""
    for item in items:
        if "bus" in getattr(item, "fixturenames", ()) or item.path.parent.name == "faults":
            item.add_marker(pytest.mark.broker)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    output: str  # both streams, as a person at the terminal sees them


class _CliRunner:
    """click's CliRunner with the same result on every click: EL9 ships 7.1, PyPI 8.x.

    8.2 and newer keep stdout and stderr apart and mix them in ``output``; older
    ones only do so when asked (``mix_stderr=False``) and then leave stderr out
    of ``output``.
    """

    def __init__(self) -> None:
        import inspect

        from click.testing import CliRunner

        self.old = "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
        self.runner = CliRunner(mix_stderr=False) if self.old else CliRunner()

    def invoke(self, *args, **kwargs) -> CliResult:
        r = self.runner.invoke(*args, **kwargs)
        output = r.stdout + r.stderr if self.old else r.output
        return CliResult(r.exit_code, r.stdout, r.stderr, output)


def cli_runner() -> _CliRunner:
    return _CliRunner()
