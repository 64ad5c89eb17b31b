"""Fixtures that boot a real systemd (tests/system/container.py).

Where the container cannot be had (not root, tools missing, offline
debootstrap) the tests are skipped with the reason; with
``PSPROBE_REQUIRE_SYSTEM=1`` (set by .ci/run on the project's machines) that
is a failure instead, so CI cannot go green by skipping them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import container as ct

BASE_CONFIG = """\
[collect]
state_dir = /var/lib/psprobe
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("PSPROBE_REQUIRE_SYSTEM") == "1":
        pytest.fail(f"system test required but unavailable: {reason}", pytrace=False)
    print(f"system test skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def system_root() -> Path:
    """The cached Debian root (built on first use, about 45 s)."""
    try:
        return ct.prepare_root()
    except ct.Unavailable as e:
        _unavailable(str(e))
        raise AssertionError("unreachable") from None


@pytest.fixture(scope="session")
def bare_container(system_root: Path) -> Iterator[ct.Container]:
    """A booted container without psprobe (for installing the RPM, say)."""
    with ct.booted(system_root) as c:
        print(f"container booted in {c.boot_seconds:.1f}s", file=sys.stderr)
        yield c


@pytest.fixture(scope="session")
def container(system_root: Path) -> Iterator[ct.Container]:
    """A booted container with psprobe installed from this source tree."""
    with ct.booted(system_root) as c:
        print(f"container booted in {c.boot_seconds:.1f}s", file=sys.stderr)
        ct.install_psprobe(c, BASE_CONFIG)
        yield c
