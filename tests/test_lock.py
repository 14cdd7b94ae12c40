"""requirements.lock (`make lock`, pip-tools) pins everything pyproject.toml asks for, as it asks.

The lock is what `make install`, the Dockerfile and CI install; a dependency added to or changed in
pyproject.toml without `make lock` fails here, naming it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
EXTRAS = ("test", "bench")  # the extras scripts/lock.sh compiles in
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"requirements.lock: '{line}' is not a plain name==version pin (run make lock)"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _project_requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [(f"[{extra}]", Requirement(r)) for r in project["optional-dependencies"][extra]]
    return [(where, r) for where, r in reqs if r.marker is None or r.marker.evaluate()]


def test_the_lock_is_plain_pins_without_package_sources():
    """Every line that is not a comment is name==version: no index, find-links, path or URL."""
    assert "make lock" in LOCK.read_text().splitlines()[4], "the header names the command that regenerates it"
    assert len(_pins()) > 50


@pytest.mark.parametrize("where, req", _project_requirements(), ids=lambda v: str(v) if isinstance(v, Requirement) else None)
def test_every_project_requirement_is_pinned_within_its_specifier(where, req):
    pins = _pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"pyproject {where} '{req}' is not in requirements.lock: run make lock"
    assert req.specifier.contains(pins[name], prereleases=True), \
        f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject {where} '{req}': run make lock"


def test_extras_of_requirements_are_pinned_too():
    """ray[default,train,tune]: the lock is compiled with --strip-extras, so each extra's own
    dependencies must be pinned as packages of their own (checked from the installed Ray's
    metadata when it is the locked version)."""
    pins = _pins()
    checked = 0
    for where, req in _project_requirements():
        if not req.extras:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != pins.get(canonicalize_name(req.name)):
            continue
        for raw in dist.requires or []:
            dep = Requirement(raw)
            wanted = [e for e in req.extras if dep.marker is not None and dep.marker.evaluate({"extra": e})]
            if wanted:
                assert canonicalize_name(dep.name) in pins, \
                    f"{dep.name} (needed by {req.name}[{','.join(wanted)}]) is not in requirements.lock: run make lock"
                checked += 1
    assert checked or not any(r.extras for _, r in _project_requirements())


def test_makefile_torch_spec_matches_the_lock():
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile sets TORCH_SPEC ?= ..."
    pins = _pins()
    for word in m.group(1).split():
        if word.startswith("-"):
            break
        req = Requirement(word)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), \
            f"TORCH_SPEC asks for {word}, requirements.lock pins {pins[canonicalize_name(req.name)]}: run make lock"
