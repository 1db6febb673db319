"""The README's Layout section names every package folder and every module in it, so a newcomer can walk
the tree from the README (and a new module that the README does not place fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "drivers", "pipeline", "firmware-sim")


def _layout_entries() -> dict[str, str]:
    """Folder (``gateway/broker/``) -> the text of its entry in the README's Layout block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"^(\S+/)\s*(.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


def _folders() -> dict[str, list[str]]:
    """Every package folder of the source tree -> the modules in it (no ``__init__``)."""
    found: dict[str, list[str]] = {}
    for top in PACKAGES:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            folder = init.parent
            found[folder.relative_to(ROOT).as_posix() + "/"] = sorted(
                p.stem for p in folder.glob("*.py") if p.stem != "__init__"
            )
    return found


def test_every_package_folder_has_an_entry() -> None:
    entries = _layout_entries()
    missing = [folder for folder in _folders() if folder not in entries]
    assert not missing, f"README Layout lacks: {missing}"


def test_every_module_is_named_in_its_folders_entry() -> None:
    entries = _layout_entries()
    unnamed = [
        f"{folder}{module}.py"
        for folder, modules in _folders().items()
        for module in modules
        if not re.search(rf"(?<![\w-]){re.escape(module)}(?![\w-])", entries.get(folder, ""))
    ]
    assert not unnamed, f"README Layout does not name: {unnamed}"


def test_no_entry_names_a_folder_that_is_gone() -> None:
    folders = _folders()
    stale = [e for e in _layout_entries() if e.split("/")[0] in PACKAGES and e not in folders]
    assert not stale, f"README Layout names folders that do not exist: {stale}"
