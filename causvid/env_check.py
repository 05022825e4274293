"""Is this environment the tested dependency set? ``python -m causvid.env_check constraints.txt``.

``constraints.txt`` pins every package CI installs (``name==version``). An environment matches when every
installed distribution is pinned there at the same public version (a local label such as ``+cpu`` is
ignored, so the CPU or a CUDA wheel of the pinned torch both match); pins that are not installed are fine (the
CUDA libraries exist only beside a CUDA build of torch). Exit 0 when it matches, 1 with one line per
difference when not, 2 when the file cannot be read.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

IGNORED = {"causvid"}  # the project itself, installed from the working tree
# The installer, not a dependency: the README's install runs with the pip a new venv brings, while .ci/run first
# upgrades it to the pin (for a reproducible resolver); another pip version is reported as a note, not a difference.
TOOLING = {"pip"}


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label (``2.14.1+cpu`` -> ``2.14.1``)."""
    return version.split("+", 1)[0]


def read_pins(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` from a constraints file of ``name==version`` lines and ``#`` comments."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected 'name==version', got {raw!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution importable in this environment."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per installed distribution that is unpinned or at another version than its pin."""
    out = []
    for name in sorted(set(have) - IGNORED - TOOLING):
        if name not in pins:
            out.append(f"{name}=={have[name]} is installed but not pinned")
        elif public_version(have[name]) != public_version(pins[name]):
            out.append(f"{name}=={have[name]} is installed, {name}=={pins[name]} is pinned")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m causvid.env_check CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    try:
        pins = read_pins(args[0])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    have = installed()
    for name in sorted(TOOLING & set(have) & set(pins)):
        if public_version(have[name]) != public_version(pins[name]):
            print(f"env_check: note: {name}=={have[name]} runs here, {name}=={pins[name]} ran in CI (the installer "
                  f"is not a dependency: `pip install -c {args[0]} --upgrade pip` to match)", file=sys.stderr)
    diff = differences(pins, have)
    for line in diff:
        print(f"env_check: {line}", file=sys.stderr)
    if diff:
        print(f"env_check: this environment is not the tested set in {args[0]} ({len(diff)} differences)",
              file=sys.stderr)
        return 1
    print(f"env_check: every installed distribution is pinned in {args[0]} at its version")
    return 0


if __name__ == "__main__":
    sys.exit(main())
