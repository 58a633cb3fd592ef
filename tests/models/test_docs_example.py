"""The model written in docs/models.md runs and passes the whole physics battery."""

import re
from pathlib import Path

from helpers.physics import PhysicsBattery

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _doc_model_class():
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(source, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["GaussianPairModel"]


def test_the_example_is_short():
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len(source.strip().splitlines()) < 40


class TestDocsExample(PhysicsBattery):
    def make_model(self):
        return _doc_model_class()(cutoff=self.cutoff)
