"""The codebase stays readable in one sitting per module: no module over 400 lines, no function over
60 (STYLE.md's caps), and Hydra/OmegaConf only at the boundary."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kbtune"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_module_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_60_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.name}"] = length
    assert long == {}


def test_hydra_is_imported_only_at_the_boundary():
    allowed = {"hydra_entry.py", "project.py"}
    for path in _modules():
        text = path.read_text()
        if re.search(r"^\s*(import hydra\b|from hydra\b|from omegaconf\b|import omegaconf\b)", text, re.M):
            assert path.name in allowed, f"{path.relative_to(SRC)} imports Hydra/OmegaConf"


def test_the_session_folder_layout_lives_in_one_module():
    for path in _modules():
        if path.name != "session_files.py":
            assert '"last.ckpt"' not in path.read_text() and '"checkpoints"' not in path.read_text(), path.name
