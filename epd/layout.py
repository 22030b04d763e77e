"""Which checkout folder each `epd.*` package lives in (DESIGN §1: the top-level
folders are the architecture; they import as `epd.<name>` so that `import
operator` is still the standard library's). setup.py builds the packages from
this table; the static gates (scripts/gates.sh) link the same tree, because
mypy and import-linter cannot follow an editable install's folder mapping."""

from __future__ import annotations

import sys
from pathlib import Path

FOLDERS = {"epd": "epd", "epd.workers": "workers", "epd.operator": "operator", "epd.bench": "bench"}
TEST_PACKAGES = ("tests", "e2e")  # top-level packages of the checkout, imported under their own names


def link_tree(checkout: Path, into: Path) -> None:
    """Lay out `into` as the installed import tree, every entry a symlink into `checkout`:
    into/epd/<entry of epd/>, into/epd/workers -> checkout/workers, ..., into/tests, into/e2e."""
    root = into / "epd"
    root.mkdir(parents=True)
    for entry in (checkout / FOLDERS["epd"]).iterdir():
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for name, folder in FOLDERS.items():
        if name != "epd":
            (root / name.removeprefix("epd.")).symlink_to(checkout / folder)
    for package in TEST_PACKAGES:
        (into / package).symlink_to(checkout / package)


if __name__ == "__main__":
    link_tree(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
