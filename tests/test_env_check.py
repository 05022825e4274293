"""The pinned dependency set (constraints.txt) and the check that an environment is that set."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from causvid import env_check

ROOT = Path(__file__).resolve().parents[1]


def test_read_pins_normalises_names_and_skips_comments(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# header\nOpen_Clip.Torch==3.3.0  # trailing comment\n\ntorch == 2.14.1\n")
    assert env_check.read_pins(f) == {"open-clip-torch": "3.3.0", "torch": "2.14.1"}


@pytest.mark.parametrize("line", ["torch>=2.14", "torch", "-e .", "torch==2.14.1 extra"])
def test_read_pins_refuses_anything_but_exact_pins(tmp_path, line):
    f = tmp_path / "c.txt"
    f.write_text(f"numpy==2.4.6\n{line}\n")
    with pytest.raises(ValueError, match=r"c\.txt:2: expected 'name==version'"):
        env_check.read_pins(f)


def test_differences_hand_made():
    pins = {"torch": "2.14.1", "numpy": "2.4.6", "nvidia-cublas": "13.1.1.3"}
    # the CPU wheel of the pinned torch matches; a pin that is not installed (CUDA libs) is fine
    assert env_check.differences(pins, {"torch": "2.14.1+cpu", "numpy": "2.4.6", "causvid": "0.1.0"}) == []
    assert env_check.differences(pins, {"torch": "2.15.0", "numpy": "2.4.6", "rich": "14.0.0"}) == [
        "rich==14.0.0 is installed but not pinned",
        "torch==2.15.0 is installed, torch==2.14.1 is pinned",
    ]


def test_main_exit_codes(tmp_path, capsys):
    assert env_check.main([str(tmp_path / "missing.txt")]) == 2
    assert env_check.main([]) == 2
    f = tmp_path / "c.txt"
    f.write_text("definitely-not-a-real-dist==1.0\n")  # nothing installed is pinned: every package differs
    assert env_check.main([str(f)]) == 1
    assert "not the tested set" in capsys.readouterr().err


def test_constraints_pin_every_dependency_inside_its_declared_range():
    """constraints.txt pins every requirement of pyproject.toml (with the dev extra) inside its range, so the
    README's install and CI install the tested versions and the ranges admit them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # this checkout's, not the installed
    pins = env_check.read_pins(ROOT / "constraints.txt")
    extras = project["optional-dependencies"]
    reqs = [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["interop"] + extras["demo"]]
    assert {"torch", "pytest", "diffusers", "peft"} <= {r.name for r in reqs}
    for req in reqs:
        name = env_check.canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req}"
