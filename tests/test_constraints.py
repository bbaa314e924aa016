"""constraints.txt, the lock `make setup` installs, agrees with setup.py's ranges.

pip would refuse a lock that contradicts setup.py only when someone runs `make setup` from nothing;
this catches it at the commit that bumps one side: every requirement of setup.py (and its `dev`
extra) has exactly one pin, and the pinned version lies in setup.py's range.
"""

import ast
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _setup_requirements():
    """install_requires + extras_require['dev'], read from setup.py's literals without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
              if kw.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in kwargs["install_requires"] + kwargs["extras_require"]["dev"]]


def _pins():
    """{canonical name: (version, line number)} from constraints.txt; each line `name==version`."""
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt:{number}: {line!r} is not name==version"
        version = Version(specs[0].version)
        assert not version.local, f"constraints.txt:{number}: {line!r} has a local label (+cpu/+cu...): it would refuse the other builds"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{number}: {req.name} pinned twice (first on line {pins[name][1]})"
        pins[name] = (version, number)
    return pins


def test_every_requirement_is_pinned_inside_its_range():
    pins = _pins()
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"setup.py requires {req.name} but constraints.txt does not pin it"
        version, number = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt:{number} pins {req.name}=={version}, outside setup.py's {req}")


def test_torch_pin_matches_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    makefile_torch = next(line.split(":=")[1].strip() for line in makefile.splitlines()
                          if line.startswith("TORCH_VERSION"))
    assert _pins()["torch"][0] == Version(makefile_torch)
