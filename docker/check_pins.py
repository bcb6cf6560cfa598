#!/usr/bin/env python
"""Check requirements/gpu.txt against the packages of the Docker base image, by PEP 440.

    python docker/check_pins.py [--pins requirements/gpu.txt] [--image docker/ngc-packages.txt]

For every pinned package it takes the requirements the pinned version declares (read from this
environment's installed metadata, which must hold the same version — the CPU venv does) plus the
runtime minimums some packages enforce without declaring them (transformers disables torch
below 2.6.0), evaluates their environment markers for the image's Python, and compares each one
that names an image package with the image's version. Pre-release image versions are allowed,
so NGC's ``2.8.0a0+...`` satisfies ``torch>=2.6`` — but ``2.6.0a0+...`` (NGC 25.01) does not:
a pre-release of 2.6.0 sorts *below* 2.6.0.

NGC PyTorch images since 25.03 pin every package they ship in /etc/pip/constraint.txt (and set
PIP_CONSTRAINT), so pip may replace none of them: a pin, or a pinned package's requirement, that
the image's version of a package does not satisfy fails the build with ResolutionImpossible. Each
is an error here: exit 1. A pin that names torch or another CUDA-built image package is an error
too (it must come from the image). Requirements of the pins' unpinned dependencies are notes
(pip may find an older release that fits). Exit 0 when the pins fit.

The pins file takes ``name==version`` for what the image lacks and ranges (``name>=version``)
for what it ships: the image's version is then used as it is.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# one reader of these list files: the stand-in build runs packages.py with the host's python3
# (standard library only), so the reader lives there
from ngc_standin.packages import content_lines, read_ngc_list  # noqa: E402

#: image packages built against the image's CUDA/compilers: pip must never replace them
PROTECTED = {"torch", "triton", "numpy", "transformer-engine", "apex", "flash-attn"}

#: minimums enforced at import time but not declared in the package metadata
RUNTIME_MINIMUMS = {
    # transformers/utils/import_utils.py: is_torch_available() is False below 2.6.0
    "transformers": ["torch>=2.6.0"],
}


def read_list(path: str) -> dict[str, str]:
    """name==version lines (comments and blank lines ignored) -> {canonical name: version}."""
    return {canonicalize_name(name): version for name, version in read_ngc_list(path)}


def read_pins(path: str) -> dict[str, Requirement]:
    """Requirement lines (``name==1.0``, ``name>=1.0``; comments and blank lines ignored)
    -> {canonical name: Requirement}."""
    out = {}
    for n, line in content_lines(path):
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise SystemExit(f"{path}:{n}: not a requirement: '{line}' ({e})")
        out[canonicalize_name(req.name)] = req
    return out


def exact_version(req: Requirement) -> str | None:
    """The version of a ``name==version`` requirement, else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def declared_requirements(name: str, version: str) -> tuple[list[str], str]:
    """(requirement strings of name==version, note). Read from this environment's metadata."""
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        return [], f"{name}=={version} is not installed here, its requirements are not checked"
    if Version(installed) != Version(version):
        return [], (f"{name}: {installed} installed here, not the pinned {version}; its "
                    f"requirements are not checked")
    return list(md.requires(name) or []), ""


def check(pins: dict[str, Requirement], image: dict[str, str]) -> tuple[list[str], list[str]]:
    """(errors, notes) for the pins (read_pins) against the image's packages (read_list)."""
    errors, notes = [], []
    if "python" not in image:
        raise SystemExit("the image list needs a python==X.Y.Z line")
    py = Version(image["python"])
    env = default_environment()
    env.update(python_version=f"{py.major}.{py.minor}", python_full_version=str(py),
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython", extra="")
    # what pip ends up with: the image's version of what it ships, the pin of what it lacks
    resolved = {name: image.get(name) or exact_version(req) for name, req in pins.items()}
    for name, pin in pins.items():
        if name in PROTECTED:
            errors.append(f"{name} is pinned ({pin}) but must come from the image "
                          f"({image.get(name, 'not listed')}); remove it from the pins")
            continue
        if name in image:
            if not pin.specifier.contains(image[name], prereleases=True):
                errors.append(f"{pin} conflicts with the image's constraint {name}=={image[name]} "
                              f"(pip: ResolutionImpossible); relax the pin to one the image's "
                              f"version meets, e.g. {name}>={image[name]}")
            continue  # the image's own version is used: nothing of it to install
        version = exact_version(pin)
        if version is None:
            notes.append(f"{pin}: not an exact pin and not in the image; its requirements are "
                         f"not checked")
            continue
        reqs, note = declared_requirements(name, version)
        if note:
            notes.append(note)
        for text in reqs + RUNTIME_MINIMUMS.get(name, []):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform / Python
            dep = canonicalize_name(req.name)
            have = image.get(dep) or resolved.get(dep)
            if have is None or req.specifier.contains(have, prereleases=True):
                continue  # pip installs it fresh, or the version there fits
            if dep in PROTECTED:
                where, fix = f"the image has {dep} {have}", f"use an image whose {dep} meets it"
            elif dep in image:
                where = f"the image's constraint file pins {dep}=={have}"
                fix = f"pin a {name} release that accepts it"
            else:
                where, fix = f"the pins say {dep}=={have}", "make the two pins agree"
            errors.append(f"{name}=={version} needs {req}, but {where}"
                          + (" (a pre-release of that version sorts below it by PEP 440)"
                             if Version(have).is_prerelease else "") + f"; {fix}")
    notes += _transitive_notes(pins, image, env)
    return errors, notes


def _transitive_notes(pins, image, env) -> list[str]:
    """Requirements of the pins' unpinned dependencies (at the versions installed here, which
    pip may not pick on the image) that an image package cannot meet: notes, not errors, as
    pip may find an older release of the dependency that fits."""
    out, seen = [], set(pins)
    todo = [name for name in pins if name not in image]
    while todo:
        name = todo.pop()
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if name not in pins and dep in image and \
                    not req.specifier.contains(image[dep], prereleases=True):
                out.append(f"{name} (a dependency, at its version here) needs {req}; the image "
                           f"pins {dep}=={image[dep]}: pip has to find an older {name}")
            if dep not in seen and dep not in image:
                seen.add(dep)
                todo.append(dep)
    return sorted(set(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pins", default=os.path.join(ROOT, "requirements", "gpu.txt"))
    p.add_argument("--image", default=os.path.join(HERE, "ngc-packages.txt"))
    args = p.parse_args(argv)
    errors, notes = check(read_pins(args.pins), read_list(args.image))
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{'FAIL' if errors else 'OK'}: {args.pins} against {args.image} "
          f"({len(errors)} error(s), {len(notes)} note(s))")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
