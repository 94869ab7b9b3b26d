"""setup.cfg lists every source folder as a package (the repository root is the ``semcorr`` namespace).

A folder left out of ``[options] packages`` is silently missing from a wheel, and from an editable
install that maps packages one by one, while every test that runs from the checkout still passes.
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Top-level folders that are not part of the package (scripts, build outputs).
NOT_PACKAGED = {"benchmarks", "build", "dist"}


def read_packages(setup_cfg: Path) -> tuple[str, list[str]]:
    """``(namespace, packages)``: the name ``package_dir`` gives the repository root, and ``[options] packages``."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    options = parser["options"]
    package_dir = dict(
        (part.strip() for part in line.split("=", 1)) for line in options.get("package_dir", "").splitlines() if "=" in line
    )
    namespace = next(name for name, folder in package_dir.items() if folder in (".", "./", ""))
    return namespace, [line.strip() for line in options["packages"].splitlines() if line.strip()]


def source_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (relative) that hold ``.py`` files, outside hidden, build and cache folders."""

    def skipped(relative: Path) -> bool:
        return (relative.parts[0] in NOT_PACKAGED
                or any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info") for part in relative.parts))

    folders = {path.parent.relative_to(root) for path in root.rglob("*.py")}
    return sorted(folder for folder in folders if folder != Path(".") and not skipped(folder))


def package_problems(root: Path) -> tuple[list[str], list[str]]:
    """``(folders missing from setup.cfg, listed packages without a folder)``."""
    namespace, packages = read_packages(root / "setup.cfg")
    expected = {".".join((namespace, *folder.parts)): folder for folder in source_folders(root)}
    missing = sorted(f"{folder.as_posix()} -> {name}" for name, folder in expected.items() if name not in packages)
    stale = sorted(name for name in packages
                   if not name.startswith(namespace + ".") or not root.joinpath(*name.split(".")[1:]).is_dir())
    return missing, stale


@pytest.fixture(scope="module")
def checkout() -> Path:
    if not (ROOT / "setup.cfg").is_file():
        pytest.skip(f"no setup.cfg in {ROOT}: the tests run from an installed copy, not from the checkout")
    return ROOT


def test_every_source_folder_is_a_listed_package(checkout):
    missing, _ = package_problems(checkout)
    assert not missing, f"add to [options] packages in setup.cfg: {missing}"
    assert "semcorr.modeling.ops" in read_packages(checkout / "setup.cfg")[1]  # nested folders are found


def test_every_listed_package_is_a_folder(checkout):
    _, stale = package_problems(checkout)
    assert not stale, f"listed in setup.cfg but no such folder: {stale}"


def test_the_check_finds_a_missing_and_a_stale_package(tmp_path):
    """The same check on a small fake checkout with one folder unlisted and one listed folder gone."""
    for folder in ("core", "core/ops", "extra", "docs", "benchmarks", ".hidden", "core/__pycache__", "x.egg-info"):
        (tmp_path / folder).mkdir(parents=True)
    for file in ("core/__init__.py", "core/ops/a.py", "extra/b.py", "benchmarks/bench.py", ".hidden/c.py",
                 "core/__pycache__/d.py", "x.egg-info/e.py"):
        (tmp_path / file).write_text("")
    (tmp_path / "docs" / "index.md").write_text("")  # no Python: not a package
    (tmp_path / "setup.cfg").write_text(
        "[options]\n# a comment\npackage_dir =\n    pkg = .\npackages =\n    pkg.core\n    pkg.core.ops\n    pkg.gone\n"
    )
    assert package_problems(tmp_path) == (["extra -> pkg.extra"], ["pkg.gone"])
