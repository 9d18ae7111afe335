"""Every config field is documented: a docstring right below it, as `maskrcnn/config.py` promises."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import maskrcnn.config as config_module

SOURCE = Path(config_module.__file__)


def _documented_fields() -> dict[str, set[str]]:
    """Per dataclass in config.py: the annotated fields followed directly by a string literal."""
    tree = ast.parse(SOURCE.read_text())
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        documented = set()
        for stmt, nxt in zip(node.body, node.body[1:] + [None]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str) and nxt.value.value.strip()):
                documented.add(stmt.target.id)
        out[node.name] = documented
    return out


def test_every_config_field_has_a_docstring():
    documented = _documented_fields()
    classes = [obj for obj in vars(config_module).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__]
    assert len(classes) >= 9
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if f.name not in documented.get(cls.__name__, set())]
    assert missing == [], f"undocumented config fields: {missing}"


def test_the_check_sees_an_undocumented_field(tmp_path, monkeypatch):
    """The check itself can fail: a field without a docstring is reported."""
    src = SOURCE.read_text().replace('    seed: int = 0\n    """Generator seed', '    seed: int = 0\n    pass\n    """x', 1)
    assert src != SOURCE.read_text()
    fake = tmp_path / "config.py"
    fake.write_text(src)
    monkeypatch.setattr(__import__(__name__), "SOURCE", fake)
    assert "seed" not in _documented_fields()["SyntheticConfig"]
