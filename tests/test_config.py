"""Configuration: defaults, conf.d order, host overrides, and one clear line per bad value."""

from __future__ import annotations

import os

import pytest
from conftest import write_config

from psprobe import config


def test_defaults_match_the_documented_ones(tmp_path):
    cfg = config.load(str(write_config(tmp_path / "p.conf", {})))
    assert cfg.collect.state_dir == "/var/lib/psprobe"
    assert cfg.collect.first_run_lookback == 12 * 3600
    assert cfg.collect.chunk_points == 200
    assert "packet-count-lost-bidir" in cfg.collect.event_types
    assert len(cfg.collect.event_types) == 13
    assert cfg.archive.schemes == ("https", "http")
    assert cfg.archive.verify is True
    assert cfg.broker.exchange == "osg.ps.raw"
    assert cfg.broker.routing_key_prefix == "perfsonar.raw."
    assert cfg.mesh.forget_after == 7 * 86400
    assert cfg.collect.interval == 600


def test_conf_d_read_in_name_order_and_later_wins(tmp_path):
    main = write_config(tmp_path / "psprobe.conf", {"collect": {"chunk_points": 10}})
    (tmp_path / "conf.d").mkdir()
    write_config(tmp_path / "conf.d" / "20-b.conf", {"collect": {"chunk_points": 30}})
    write_config(tmp_path / "conf.d" / "10-a.conf", {"collect": {"chunk_points": 20},
                                                      "archive": {"timeout": "5s"}})
    cfg = config.load(str(main))
    assert cfg.collect.chunk_points == 30
    assert cfg.archive.timeout == 5
    assert cfg.files[1:] == (str(tmp_path / "conf.d" / "10-a.conf"),
                             str(tmp_path / "conf.d" / "20-b.conf"))


def test_host_sections_override_one_host_only(tmp_path):
    p = write_config(tmp_path / "p.conf", {
        "archive": {"verify": "yes"},
        "host PS-1.Example.org.": {"verify": "no", "chunk_points": 50, "broker.exchange": "other"},
    })
    cfg = config.load(str(p))
    h = cfg.for_host("ps-1.example.org")
    assert (h.archive.verify, h.collect.chunk_points, h.broker.exchange) == (False, 50, "other")
    o = cfg.for_host("ps-2.example.org")
    assert (o.archive.verify, o.collect.chunk_points, o.broker.exchange) == (True, 200, "osg.ps.raw")


@pytest.mark.parametrize(("section", "key", "value", "words"), [
    ("collect", "chunk_points", "many", "not a number"),
    ("collect", "chunk_points", "0", "outside"),
    ("collect", "first_run_lookback", "12 parsecs", "not a duration"),
    ("collect", "state_dir", "relative/dir", "absolute path"),
    ("collect", "event_types", "throughput, ../x", "bad event type"),
    ("archive", "schemes", "ftp", "https and/or http"),
    ("archive", "verify", "maybe", "yes, no or an existing CA file"),
    ("archive", "cert", "/nonexistent/cert.pem", "no such file"),
    ("archive", "parallel", "1000", "outside"),
    ("broker", "url", "http://broker/", "amqp://"),
    ("broker", "url", "amqp://host:99999/", "port"),
    ("broker", "heartbeat", "-1", "outside"),
    ("mesh", "forget_after", "soon", "not a duration"),
    ("report", "to", "not-an-address", "e-mail"),
    ("collect", "no_such_key", "1", "unknown key"),
    ("collect", "interval", "7min", "whole minutes dividing an hour or whole hours dividing a day"),
    ("collect", "interval", "90s", "use 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60min"),
    ("collect", "interval", "30s", "or 2, 3, 4, 6, 8, 12 or 24h"),
    ("collect", "interval", "48h", "whole hours dividing a day"),
    ("collect", "interval", "0", "whole minutes"),
    ("collect", "interval", "soon", "not a duration"),
    ("mesh", "shard", "0/3", "must be K/N with 1 <= K <= N <= 1000 (like 2/3), or none: '0/3'"),
    ("mesh", "shard", "4/3", "'4/3'"),
    ("mesh", "shard", "a/b", "'a/b'"),
    ("mesh", "shard", "3", "must be K/N"),
])
def test_bad_value_is_one_line_naming_file_section_and_key(tmp_path, section, key, value, words):
    p = write_config(tmp_path / "p.conf", {section: {key: value}})
    with pytest.raises(config.ConfigError) as e:
        config.load(str(p))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: [{section}] {key}: ")
    assert words in msg


@pytest.mark.parametrize(("text", "seconds"), [
    ("1min", 60), ("5m", 300), ("10min", 600), ("600", 600), ("15min", 900), ("30min", 1800),
    ("60min", 3600), ("1h", 3600), ("2h", 7200), ("6h", 21600), ("12h", 43200), ("24h", 86400),
    ("1d", 86400),
])
def test_interval_takes_what_divides_an_hour_or_a_day(tmp_path, text, seconds):
    cfg = config.load(str(write_config(tmp_path / "p.conf", {"collect": {"interval": text}})))
    assert cfg.collect.interval == seconds
    assert isinstance(cfg.collect.interval, int)


def test_interval_per_host(tmp_path):
    p = write_config(tmp_path / "p.conf", {"collect": {"interval": "5min"},
                                           "host slow.example.org": {"interval": "1h"}})
    cfg = config.load(str(p))
    assert cfg.for_host("slow.example.org").collect.interval == 3600
    assert cfg.for_host("other.example.org").collect.interval == 300


@pytest.mark.parametrize(("text", "value"), [
    ("", None), ("none", None), ("1/1", (1, 1)), ("2/3", (2, 3)), (" 3 / 3 ", (3, 3)),
])
def test_shard_is_k_of_n_or_none(tmp_path, text, value):
    cfg = config.load(str(write_config(tmp_path / "p.conf", {"mesh": {"shard": text}})))
    assert cfg.mesh.shard == value
    assert config.load(str(write_config(tmp_path / "q.conf", {}))).mesh.shard is None


def test_unknown_section_and_bad_host_section(tmp_path):
    p = write_config(tmp_path / "p.conf", {"colect": {"x": 1}})
    with pytest.raises(config.ConfigError, match=r"\[colect\]: unknown section"):
        config.load(str(p))
    p = write_config(tmp_path / "p.conf", {"host ../etc": {"verify": "no"}})
    with pytest.raises(config.ConfigError, match=r"not a valid host"):
        config.load(str(p))


def test_missing_file_and_syntax_error(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.conf"))
    bad = tmp_path / "bad.conf"
    bad.write_text("no section header\n")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(bad))


def test_secrets_file_must_not_be_world_readable(tmp_path):
    s = tmp_path / "secret"
    s.write_text("s3cret\n")
    os.chmod(s, 0o644)
    with pytest.raises(config.ConfigError, match="world-readable"):
        config.read_secret(str(s), "[broker] password_file")
    os.chmod(s, 0o640)
    assert config.read_secret(str(s), "[broker] password_file") == "s3cret"


def test_redact_url_hides_password():
    assert config.redact_url("amqp://u:p%40ss@h:5672/v") == "amqp://u:***@h:5672/v"
    assert config.redact_url("amqp://h/") == "amqp://h/"
