"""Config problems: each names the field, shows the value and gives the fix; all are raised at once."""

from __future__ import annotations

from typing import Any


def problem(field: str, value: Any, fix: str) -> str:
    return f"{field} = {value!r}: {fix}"


class ConfigError(ValueError):
    """Every problem of one config, each naming the field, the value and the fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")
