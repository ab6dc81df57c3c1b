"""What ships besides the code: the licence, the changelog, the systemd unit."""

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.python.reflect import namedAny

import elevgw

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "elevgw.service"


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    return unit


def test_license_is_the_mit_license_setup_cfg_declares():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_changelog_has_an_entry_for_the_current_version():
    assert f"\n{elevgw.__version__} " in (ROOT / "CHANGELOG.rst").read_text()


def test_systemd_unit_runs_twistd_in_the_foreground_with_a_logger_that_exists():
    service = read_unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/twistd") and "-n" in command
    assert command[-1] == "elevgw"
    logger = command[command.index("--logger") + 1]
    assert callable(namedAny(logger))
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 10  # longer than the default --drain-timeout
    assert int(service["LimitNOFILE"]) >= 65536
    assert read_unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """Where systemd is installed; the test above checks the unit everywhere else."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists(), "twistd is installed next to this Python"
    unit = tmp_path / "elevgw.service"
    # verify checks that ExecStart's binary exists: point it at this environment's twistd.
    unit.write_text(UNIT.read_text().replace("/opt/elevgw/.venv/bin/twistd", str(twistd)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_every_file_under_src_ships_in_the_package(monkeypatch):
    """A new subpackage (or a console's static file) missing from setup.cfg would be left
    out of ``pip install .``: the gateway would then fail on a clean machine only."""
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    distribution = Distribution({"script_name": "setup.py"})
    distribution.parse_config_files(["setup.cfg"])
    build_py = distribution.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {module[-1] for module in build_py.find_all_modules()}
    for _, source, _, names in build_py.data_files:
        shipped.update(f"{source}/{name}" for name in names)
    present = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "src" / "elevgw").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert present - shipped == set()
    assert "twisted/plugins/elevgw_plugin.py" in shipped


#: What a document of this project must not lean on: files outside the repository, an
#: issue tracker's numbering, the design documents the project was built from.
OUTSIDE_REFERENCES = re.compile(
    r"\bSPEC\b|SPEC\.md|FIELD-NOTES|[Ff]ield notes|\.\./shared|\b[Tt]he seed\b|seed's"
    r"|\bits issue\b|\b[Ii]ssue[ -]?#?\d"
)


def test_docs_code_and_comments_stand_alone():
    """A reader of a fresh clone can follow every reference: none points outside the repo."""
    found = []
    for top in ("README.rst", "CHANGELOG.rst", "docs", "src", "mock", "tests", "bench", "contrib"):
        for path in [ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix not in {
                ".py",
                ".rst",
                ".yml",
                ".service",
                ".js",
                ".html",
                ".md",
                "",
            }:
                continue
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE_REFERENCES.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_every_document_renders_without_a_warning():
    """The README is the package's long description: a broken table shows as raw text on the
    package index, and in every reader that renders it."""
    import docutils.core
    import docutils.utils

    documents = [
        ROOT / "README.rst",
        ROOT / "CHANGELOG.rst",
        *sorted((ROOT / "docs").glob("*.rst")),
    ]
    problems = []
    for path in documents:
        try:
            docutils.core.publish_doctree(
                path.read_text(encoding="utf-8"),
                source_path=str(path),
                settings_overrides={"report_level": 5, "halt_level": 2},
            )
        except docutils.utils.SystemMessage as message:
            problems.append(f"{path.relative_to(ROOT)}: {message}")
    assert problems == []
