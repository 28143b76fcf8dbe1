"""The built wheel is the product a user installs: every package folder is in it, and from a fresh
venv (the wheel installed there, the test venv's third-party packages beside it, no network) the
`prefloop` command starts and every module imports. An editable install hides a package missing
from pyproject's list; these tests do not.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """import name -> folder of every package in the tree (a folder with an __init__.py below a
    folder that pyproject maps to an import name)."""
    found = {}
    for name, folder in pyproject()["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_pyproject_lists_every_package_folder():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages misses {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tree (a build/ folder in the checkout may hold modules
    that no longer exist, and the build must not write into the checkout)."""
    src, out = tmp_path_factory.mktemp("src") / "prefloop", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "data", ".bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, timeout=600)
    return next(out.glob("prefloop-*.whl"))


def test_the_wheel_holds_every_module_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{'/'.join(pkg.split('.'))}/{py.name}"
                for pkg, folder in package_folders().items() for py in folder.glob("*.py")}
    assert expected - names == set()
    assert "prefloop/server/api/web/index.html" in names
    assert any(n.startswith("prefloop/server/model/csrc/") for n in names)


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and the test venv's packages on its path (a .pth
    line: the test venv's editable prefloop is not activated, its finder runs from .pth files of
    real site dirs only)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, timeout=600)
    return venv


def test_the_installed_wheel_serves_help(wheel_venv):
    res = subprocess.run([str(wheel_venv / "bin" / "prefloop"), "serve", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=wheel_venv)
    assert res.returncode == 0, res.stderr
    assert "--http-port" in res.stdout and "--data-dir" in res.stdout


IMPORT_ALL = """
import importlib, pkgutil, sys, prefloop
root = prefloop.__path__[0]
assert root.startswith(sys.prefix), f"prefloop imported from {root}, not the wheel in {sys.prefix}"
names = sorted(m.name for m in pkgutil.walk_packages(prefloop.__path__, "prefloop.")
               if not m.name.endswith("__main__"))
for name in names:
    module = importlib.import_module(name)
    assert module.__file__.startswith(sys.prefix), (name, module.__file__)
print(len(names))
"""


def test_every_module_imports_from_the_installed_wheel(wheel_venv):
    res = subprocess.run([str(wheel_venv / "bin" / "python"), "-c", IMPORT_ALL], capture_output=True,
                         text=True, timeout=600, cwd=wheel_venv)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = sum(len(list(f.glob("*.py"))) - (f / "__main__.py").exists()
                   for f in package_folders().values())
    assert int(res.stdout.split()[-1]) == expected
