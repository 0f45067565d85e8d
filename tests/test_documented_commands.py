"""Every `python -m ...` command that README.md, the model card and docs/ tell people to run exists and
answers --help (sub-commands too: `python -m bot run --help`, `python -m models.torch_port pack --help`).

The list is read from the documents themselves, so a command renamed in code but not in the docs (or
documented but never written) fails here.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
DOCUMENTS = [PROJECT / "README.md", PROJECT / "models" / "MODEL_CARD.md", *sorted((PROJECT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m ([a-z_][a-z0-9_.]*)(?: ([a-z][a-z_-]*))?")
# Modules whose first positional word is a sub-command (python -m bot run, python -m models.torch_port pack).
SUBCOMMANDS = {"bot": {"run", "serve", "worker", "join"}, "models.torch_port": {"pack", "import", "teacher"}}
NEEDS_TORCH = {"models.train_torch"}


def documented_commands() -> list[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for document in DOCUMENTS:
        for module, word in COMMAND.findall(document.read_text()):
            module = module.rstrip(".")
            if module.split(".")[0] not in {"bot", "models", "signaling", "storage"}:
                continue
            found.add((module, word) if word in SUBCOMMANDS.get(module, set()) else (module,))
    return sorted(found)


def test_the_documents_name_the_main_commands():
    commands = documented_commands()
    for expected in [("bot", "run"), ("bot", "join"), ("bot.simulate",), ("models.evaluate",), ("models.bench",),
                     ("models.train",), ("storage.export",)]:
        assert expected in commands


@pytest.mark.parametrize("command", documented_commands(), ids=" ".join)
def test_each_documented_command_answers_help(command):
    if command[0] in NEEDS_TORCH:
        pytest.importorskip("torch", reason="the GPU trainer needs PyTorch (the gpu-train extra)")
    result = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=PROJECT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout.lower()
