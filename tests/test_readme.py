"""The README's promises that a file can check: the quick start, CI's command and the configuration table."""

from __future__ import annotations

import re

from testkit import REPO

from service.launcher import config_table
from worker.config import Settings

ROOT = REPO
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_make_commands() -> None:
    assert quick_start_commands() == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: install\b", makefile, re.MULTILINE)
    assert re.search(r"^test: install\b", makefile, re.MULTILINE)


def test_ci_runs_the_readme_test_command_with_the_shared_data() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert "set -euo pipefail" in commands
    assert "../shared/data" in ci and "../shared/weights" in ci
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111


def test_configuration_table_is_the_generated_one() -> None:
    table = README.split("<!-- config-table:start -->\n", 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert table.strip() == config_table(), "README is stale: paste the output of `make config-table`"
    for name in Settings.model_fields:
        assert f"`TL_{name.upper()}`" in table
