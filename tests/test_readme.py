"""The README's quick start is itself a test: its Python block must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert out.startswith("Batch(num_structures=8")
    max_length = float(re.search(r"tensor\(([\d.]+)\)", out).group(1))
    assert max_length <= 6.0 + 1e-4


def test_readme_first_screen_names_the_two_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_training_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its training example"
    code = blocks[1].replace("max_epochs=2", "max_epochs=1, limit_train_batches=3, limit_val_batches=2")
    code = code.replace("logger=False", "logger=False, enable_progress_bar=False")
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README
    force_mae = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < force_mae < 1.0  # eV/Å, not normalised units
