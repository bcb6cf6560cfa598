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

A requirement the image cannot meet is an error when pip would have to replace an image package
that must stay (torch and the CUDA-built stack): exit 1. For other image packages pip would
upgrade them; that is reported as a note. Exit 0 when the pins fit.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: image packages built against the image's CUDA/compilers: pip must never replace them
PROTECTED = {"torch", "triton", "numpy", "transformer-engine", "apex", "flash-attn"}

#: minimums enforced at import time but not declared in the package metadata
RUNTIME_MINIMUMS = {
    # transformers/utils/import_utils.py: is_torch_available() is False below 2.6.0
    "transformers": ["torch>=2.6.0"],
}


def read_list(path: str) -> dict[str, str]:
    """name==version lines (comments and blank lines ignored) -> {canonical name: version}."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "==" not in line:
                raise SystemExit(f"{path}:{n}: expected name==version, got '{line}'")
            name, version = (s.strip() for s in line.split("==", 1))
            out[canonicalize_name(name)] = version
    return out


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


def check(pins: dict[str, str], image: dict[str, str]) -> tuple[list[str], list[str]]:
    """(errors, notes)."""
    errors, notes = [], []
    if "python" not in image:
        raise SystemExit("the image list needs a python==X.Y.Z line")
    py = Version(image["python"])
    env = default_environment()
    env.update(python_version=f"{py.major}.{py.minor}", python_full_version=str(py),
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython", extra="")
    for name, version in pins.items():
        if name in PROTECTED:
            errors.append(f"{name} is pinned ({version}) but must come from the image "
                          f"({image.get(name, 'not listed')}); remove it from the pins")
        elif name in image and Version(image[name]) != Version(version):
            notes.append(f"{name}: the pin {version} replaces the image's {image[name]}")
        reqs, note = declared_requirements(name, version)
        if note:
            notes.append(note)
        for text in reqs + RUNTIME_MINIMUMS.get(name, []):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform / Python
            dep = canonicalize_name(req.name)
            if dep in pins:  # pinned together: the pin must fit the requirement
                if not req.specifier.contains(pins[dep], prereleases=True):
                    errors.append(f"{name}=={version} needs {req}, but the pins say "
                                  f"{dep}=={pins[dep]}")
                continue
            if dep not in image:
                continue  # pip installs it fresh: nothing in the image to conflict with
            if not req.specifier.contains(image[dep], prereleases=True):
                msg = (f"{name}=={version} needs {req}, but the image has {dep} {image[dep]}"
                       + (" (a pre-release of that version sorts below it by PEP 440)"
                          if Version(image[dep]).is_prerelease else ""))
                (errors if dep in PROTECTED else notes).append(
                    msg if dep in PROTECTED else msg + "; pip will replace it")
    notes += _transitive_notes(pins, image, env)
    return errors, notes


def _transitive_notes(pins, image, env) -> list[str]:
    """Requirements of the pins' unpinned dependencies (at the versions installed here, which
    pip may not pick on the image) that an image package must stay within: notes, not errors."""
    out, seen = [], set(pins)
    todo = list(pins)
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
            if name not in pins and dep in PROTECTED and dep in image and \
                    not req.specifier.contains(image[dep], prereleases=True):
                out.append(f"{name} (a dependency, at its version here) needs {req}; the image "
                           f"has {dep} {image[dep]}: pin an older {name} if pip picks this one")
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return sorted(set(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pins", default=os.path.join(ROOT, "requirements", "gpu.txt"))
    p.add_argument("--image", default=os.path.join(HERE, "ngc-packages.txt"))
    args = p.parse_args(argv)
    errors, notes = check(read_list(args.pins), read_list(args.image))
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{'FAIL' if errors else 'OK'}: {args.pins} against {args.image} "
          f"({len(errors)} error(s), {len(notes)} note(s))")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
