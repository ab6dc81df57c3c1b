"""Print a pip constraints file that pins every dependency in setup.cfg to its floor.

    python tools/min_constraints.py [setup.cfg] > min-constraints.txt
    pip install --constraint min-constraints.txt '.[test]'

``install_requires`` entries such as ``Twisted[tls]>=23.10`` become ``Twisted==23.10``;
``--extra test`` does the same for an extra. Installing with the result tests the oldest
versions setup.cfg claims to work with, so a floor that is too low fails the suite instead
of a user's first start. A dependency without a ``>=`` floor is an error: every direct
dependency must say which is the oldest version it works with.

Dependencies of dependencies are left to pip: none needs a pin with today's floors. If one
ever does, pin it here with the reason, not in setup.cfg.
"""

from __future__ import annotations

import argparse
import configparser
import re
import sys
from pathlib import Path

# name, optional [extras], then the specifiers, then an optional ``; marker``.
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<specs>[^;]*?)\s*(?:;.*)?$"
)


class NoFloor(ValueError):
    """A requirement in setup.cfg has no ``>=`` lower bound."""


def floor_pins(requirements: str) -> list[str]:
    """``name==floor`` for each requirement line (``name[extra]>=floor,<cap`` and the like)."""
    pins = []
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQUIREMENT.match(line)
        if match is None:
            raise NoFloor(f"cannot read the requirement {line!r}")
        floors = [
            spec.strip()[2:].strip()
            for spec in match["specs"].split(",")
            if spec.strip().startswith(">=")
        ]
        if len(floors) != 1:
            raise NoFloor(f"{line!r} needs exactly one '>=' floor")
        pins.append(f"{match['name']}=={floors[0]}")
    return pins


def constraints(setup_cfg: Path, extras: list[str]) -> str:
    config = configparser.ConfigParser(interpolation=None)
    config.read(setup_cfg, encoding="utf-8")
    sections = [config["options"]["install_requires"]]
    sections += [config["options.extras_require"][extra] for extra in extras]
    lines = [f"# The declared floors of {setup_cfg.name}, written by tools/min_constraints.py."]
    for section in sections:
        lines += floor_pins(section)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setup_cfg", nargs="?", type=Path, default=Path("setup.cfg"))
    parser.add_argument("--extra", action="append", default=[], help="also pin this extra")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text = constraints(args.setup_cfg, args.extra)
    except (NoFloor, KeyError) as e:
        print(f"{args.setup_cfg}: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
