"""One test per Molecule scenario (a directory with a molecule.yml under extensions/molecule/).

Each runs `molecule test -s <scenario>` in a fresh lab (tests/roles/lab.py) and must exit 0.
"""

from __future__ import annotations

import pytest

from tests.roles import lab

SCENARIO_ROOT = lab.REPO / "extensions" / "molecule"
SCENARIOS = sorted(path.parent.name for path in SCENARIO_ROOT.glob("*/molecule.yml"))
TAIL_LINES = 120


@pytest.mark.timeout(2400)  # a cold rootfs build (about a minute) plus the scenario
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario: str) -> None:
    code, output = lab.run_molecule(scenario)
    tail = "\n".join(output.splitlines()[-TAIL_LINES:])
    assert code == 0, f"molecule test -s {scenario} exited {code}; last {TAIL_LINES} lines:\n{tail}"


def test_scenarios_found() -> None:
    """The list comes from the directories: an empty one would make this module pass vacuously."""
    assert "mosquitto" in SCENARIOS
