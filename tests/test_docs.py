"""The documentation runs: the docstring examples of torch_memops.ops, the README's Python
example, and the README's set-up commands are the ones CI runs."""

import doctest
import re
from pathlib import Path

import pytest
import torch

from torch_memops import ops

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def fenced_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("name", ops.__all__)
def test_docstring_examples_run(name):
    tests = doctest.DocTestFinder().find(getattr(ops, name), name,
                                         globs={"torch": torch, **vars(ops)})
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0, f"{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_readme_example_gives_what_the_readme_says(capsys):
    (example,) = fenced_blocks("python")
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    pages, lengths, out = namespace["pages"], namespace["lengths"], namespace["out"]
    # What the text under the example promises.
    assert pages.shape == (1, 8, 32)
    assert bool((pages[..., 0] == 0).all())
    assert bool((pages[..., -4:] == torch.arange(246, 250, dtype=torch.int32)).all())
    assert bool((lengths == 512).all())
    assert out.shape == (1, 32, 128)
    assert capsys.readouterr().out.strip().endswith("torch.Size([1, 32, 128])")


def test_readme_setup_commands_are_the_ones_ci_runs():
    commands = [block.strip() for block in fenced_blocks("bash")[:2]]
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    ci_script = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_script, f"`{command}` is not a line of .ci/run"

