"""The README shows exactly the examples that the tests run, and its two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from readme_examples import CLI, LANGCHAIN, PYTHON

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_examples_are_in_the_readme_verbatim():
    for name, snippet in {
        "python": PYTHON,
        "langchain": LANGCHAIN,
        "cli": CLI,
    }.items():
        assert snippet in README, f"the README's {name} example differs from tests/readme_examples.py"


def test_setup_section_has_exactly_the_two_commands():
    setup = README.split("## Set-up", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", setup, flags=re.M)
    assert commands == ["make demo", "make test"]


def test_readme_is_short():
    assert len(README.splitlines()) <= 160
