"""What README.md tells a user to type works, and what it says of the rules matches the code."""

from __future__ import annotations

import re
from pathlib import Path

from selfie_lora.domain.accounts import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, password_problem

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_text() -> str:
    """The README with each line break and the indentation after it as one space: an example
    wraps across lines."""
    return re.sub(r"\s*\n\s*", " ", README.read_text())


def test_the_password_examples_are_passwords_the_commands_take() -> None:
    text = readme_text()
    examples = re.findall(r"printf '([^']*)' \| selfie-lora users (?:create|password) (\S+)", text)
    assert examples, "the README shows no password read from standard input"
    for lines, name in examples:
        first, second = lines.split("\\n")[:2]
        assert first == second, lines
        assert password_problem(first, name=name) is None, (first, password_problem(
            first, name=name))
    # The rule is said, with the code's figures.
    assert f"at least {MIN_PASSWORD_LENGTH} characters** (at most {MAX_PASSWORD_LENGTH})" in text
