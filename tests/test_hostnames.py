"""psprobe.hostnames: the allow-list every host name from a mesh, a config or a unit goes through."""

from __future__ import annotations

import re

import pytest

from psprobe.hostnames import BadHost, from_instance, normalise, split, unit_instance

GOOD = {
    "ps1.example.org": "ps1.example.org",
    "PS-Dev5.GRNOC.iu.EDU.": "ps-dev5.grnoc.iu.edu",
    "perfsonar-dev8.grnoc.iu.edu:8085": "perfsonar-dev8.grnoc.iu.edu:8085",
    "asdf": "asdf",  # single label: the mesh-level archive of the real latentput mesh
    "198.128.151.17": "198.128.151.17",
    "10.0.0.1:65535": "10.0.0.1:65535",
    "2001:DB8:0:0::1": "[2001:db8::1]",
    "[2001:db8::1]": "[2001:db8::1]",
    "[2001:0db8::0001]:8443": "[2001:db8::1]:8443",
    "2001:400:210:151::25": "[2001:400:210:151::25]",  # label address in pSConfig example-2
    "::ffff:1.2.3.4": "[::ffff:102:304]",  # same text on every Python (3.13 changed str())
    "xn--80ak6aa92e.com": "xn--80ak6aa92e.com",  # punycode is plain ASCII DNS
    "a" * 63 + ".example.org": "a" * 63 + ".example.org",
}

BAD = {
    "": "empty",
    "../etc/passwd": "'/'",
    "/": "'/'",
    "a..b.example.org": "empty label",
    ".example.org": "empty label",
    "evil.example.org;reboot": "';'",
    "sp ace.example.org": "' '",
    "a.example.org\n<3>forged": "'\\n'",
    "a.example.org\r": "'\\r'",
    "user@host.example.org": "'@'",
    "a\\x2db.example.org": "'\\\\'",
    "50%.example.org": "'%'",
    "fe80::1%eth0": "'%'",
    "ex\u0430mple.org": "'\\u0430'",  # Cyrillic a
    "example\uff0eorg": "'\\uff0e'",  # fullwidth full stop
    "b\u00fccher.example": "'\\xfc'",
    "host_name.example.org": "'_'",
    "x" * 64 + ".example.org": "longer than 63",
    ".".join(["a" * 60] * 4) + ".org": "longer than",
    "-lead.example.org": "starts or ends with '-'",
    "trail-.example.org": "starts or ends with '-'",
    "1.2.3.999": "IPv4",
    "1.2.3": "IPv4",
    "01.2.3.4": "IPv4",
    "host.example.org:0": "port",
    "host.example.org:65536": "port",
    "host.example.org:080": "port",
    "host.example.org:": "port",
    "host.example.org:http": "port",
    "[2001:db8::1]:": "port",
    "[1.2.3.4]": "IPv6",
    "[2001:db8::1": "brackets",
    "2001:db8::1]": "brackets",
    "[2001:db8::1]x": "brackets",
    "2001:db8:::1": "IPv6",
    "example.org.:8080:9": "IPv6",
}


@pytest.mark.parametrize("raw", sorted(GOOD))
def test_good_names_normalise_to_one_key(raw):
    key = normalise(raw)
    assert key == GOOD[raw]
    assert normalise(key) == key


@pytest.mark.parametrize("raw", sorted(BAD))
def test_bad_names_are_refused_with_the_reason(raw):
    with pytest.raises(BadHost) as e:
        normalise(raw)
    assert BAD[raw] in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw", [None, 42, b"host.example.org", ["a"]])
def test_non_strings_are_refused(raw):
    with pytest.raises(BadHost, match="not a string"):
        normalise(raw)


def test_badhost_is_a_valueerror():
    assert issubclass(BadHost, ValueError)


def test_a_key_too_long_for_a_unit_name_is_refused():
    name = ".".join(["a" * 59] * 4)  # 239 characters: longest that fits psprobe@<key>.service
    assert normalise(name) == name
    assert len(f"psprobe@{unit_instance(name)}.service") == 255
    with pytest.raises(BadHost, match="unit name"):
        normalise(name + ":1")


def test_split():
    assert split("ps.example.org") == ("ps.example.org", None)
    assert split("ps.example.org:8085") == ("ps.example.org", 8085)
    assert split("[2001:db8::1]") == ("[2001:db8::1]", None)
    assert split("[2001:db8::1]:8443") == ("[2001:db8::1]", 8443)


UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")


@pytest.mark.parametrize("key", sorted(set(GOOD.values())))
def test_unit_instance_round_trips(key):
    inst = unit_instance(key)
    assert UNIT_CHARS.fullmatch(inst), inst
    assert from_instance(inst) == key
    # What an ExecStart= line hands over after C-unescaping %i.
    assert from_instance(inst.encode().decode("unicode_escape")) == key


def test_unit_instance_keeps_dashes_and_escapes_brackets():
    assert unit_instance("a-b.example.org:8085") == "a-b.example.org:8085"
    assert unit_instance("[2001:db8::1]:8443") == "\\x5b2001:db8::1\\x5d:8443"


def test_from_instance_accepts_systemd_escape_output_and_normalises():
    # systemd-escape writes '-' as \x2d; someone may enable a timer that way.
    assert from_instance("a\\x2db.example.org") == "a-b.example.org"
    assert from_instance("PS.Example.ORG") == "ps.example.org"


@pytest.mark.parametrize("inst", ["..", "a\\x2fb", "a\\x2e\\x2e", "a\\x0ab", "a\\xzz", "a\\\\b", "a b", ""])
def test_from_instance_refuses_what_unescapes_to_a_bad_name(inst):
    with pytest.raises(BadHost):
        from_instance(inst)
