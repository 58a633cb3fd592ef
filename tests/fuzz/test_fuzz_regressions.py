"""Every input a fuzz run found (saved by experiments/fuzz.py), replayed: each now loads or is refused.

``regressions/<target>/<name>.bin`` is fed to that target as found; on the code before its fix each
raised another exception, hung, or allocated gigabytes (the message in the commit that added it).
"""

from pathlib import Path

import pytest
from helpers.fuzz import TARGETS, run

#: Found and not fixed yet, with why: the check stays, expected to fail until the fix lands.
OPEN: dict[str, str] = {}
FOUND = [
    pytest.param(p, id=name, marks=[pytest.mark.xfail(strict=True, reason=OPEN[name])] if name in OPEN else [])
    for p in sorted((Path(__file__).parent / "regressions").glob("*/*.bin"))
    for name in [f"{p.parent.name}/{p.stem}"]
]


@pytest.mark.parametrize("path", FOUND)
def test_found_input_is_refused_with_a_project_error(path, workdir):
    assert run(TARGETS[path.parent.name], path.read_bytes(), workdir) is not None
