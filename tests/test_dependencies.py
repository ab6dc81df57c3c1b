"""What elevgw relies on inside its dependencies, and the floors setup.cfg declares for them.

tox's ``py3-min`` environment runs the whole suite on the oldest release of each dependency
that setup.cfg allows; these tests make the quiet reliances fail there (and on a new release)
instead of passing unnoticed.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import types
from pathlib import Path

import autobahn.twisted.websocket as autobahn_twisted
import autobahn.websocket.protocol as autobahn_protocol
import pytest
from prometheus_client import exposition

from elevgw.observe import metrics

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "min_constraints.py"


def load_tool() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("min_constraints", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def globals_read_by_functions(module: types.ModuleType) -> set[str]:
    """The global names the functions and methods of ``module`` look up when they run (not
    what the module binds at import), read from its source so a patch cannot hide them."""
    code = compile(inspect.getsource(module), module.__file__ or module.__name__, "exec")
    names: set[str] = set()
    nested = [const for const in code.co_consts if isinstance(const, types.CodeType)]
    while nested:
        body = nested.pop()
        names.update(body.co_names)
        nested.extend(const for const in body.co_consts if isinstance(const, types.CodeType))
    return names


def test_autobahn_formats_its_debug_lines_with_the_functions_the_gateway_replaces():
    """``elevgw.south.protocol`` swaps these module globals for a no-op to skip formatting
    debug lines nobody sees. Setting a module attribute never fails, so if Autobahn renamed
    them the patch would silently do nothing and every frame would pay for the formatting."""
    assert {"hltype", "hlval", "pformat"} <= globals_read_by_functions(autobahn_protocol)
    assert {"hltype", "hlval"} <= globals_read_by_functions(autobahn_twisted)


def test_metrics_are_served_with_the_content_type_of_the_text_prometheus_client_writes():
    text_format = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
    assert metrics.CONTENT_TYPE == text_format
    assert metrics.Metrics().render()[1] == text_format


def test_floors_become_exact_pins_without_extras_or_caps():
    tool = load_tool()
    requirements = """
        Twisted[tls]>=25.5.0
        # a comment line
        oss2>=2.18.4,<3  # a cap is not a floor
        attrs >= 22.2.0 ; python_version >= "3.11"
    """
    assert tool.floor_pins(requirements) == [
        "Twisted==25.5.0",
        "oss2==2.18.4",
        "attrs==22.2.0",
    ]


@pytest.mark.parametrize("requirement", ["klein", "klein<25", "klein==24.8.0", "klein>=1,>=2"])
def test_a_dependency_without_one_floor_is_refused(requirement):
    tool = load_tool()
    with pytest.raises(tool.NoFloor, match="klein"):
        tool.floor_pins(requirement)


def test_the_tool_writes_the_constraints_file_tox_installs_with(tmp_path):
    output = tmp_path / "min.txt"
    subprocess.run(
        [sys.executable, str(TOOL), str(ROOT / "setup.cfg"), "--output", str(output)],
        check=True,
        timeout=60,
    )
    lines = [line for line in output.read_text().splitlines() if not line.startswith("#")]
    assert any(line.startswith("Twisted==") for line in lines)
    assert all("==" in line and "[" not in line for line in lines)


def test_the_tool_fails_with_one_line_on_a_requirement_without_floor(tmp_path):
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text("[options]\ninstall_requires =\n    Twisted>=25.5.0\n    klein\n")
    result = subprocess.run(
        [sys.executable, str(TOOL), str(setup_cfg)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == f"{setup_cfg}: 'klein' needs exactly one '>=' floor"
