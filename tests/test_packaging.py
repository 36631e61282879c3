"""The installed package list stays honest: only `sarformer_jax` reaches site-packages, the
mapped folders install under it, and every folder with an __init__.py is listed in pyproject."""

import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs():
    st = _pyproject()["tool"]["setuptools"]
    mapping = st.get("package-dir", {})
    out = {}
    for pkg in st["packages"]:
        if pkg in mapping:
            out[pkg] = ROOT / mapping[pkg]
        else:
            out[pkg] = ROOT.joinpath(*pkg.split("."))
    return out


def test_listed_packages_match_folders():
    listed = _package_dirs()
    for pkg, folder in listed.items():
        assert (folder / "__init__.py").is_file(), f"{pkg} -> {folder} has no __init__.py"
    mapped_roots = {ROOT / "sarformer_jax"} | {p for p in listed.values()}
    found = set()
    for root in mapped_roots:
        for init in root.rglob("__init__.py"):
            found.add(init.parent)
    missing = sorted(str(p.relative_to(ROOT)) for p in found - set(listed.values()))
    assert not missing, f"folders with __init__.py not listed in pyproject packages: {missing}"


def test_scripts_and_tests_are_not_packages():
    assert not (ROOT / "scripts" / "__init__.py").exists()
    assert not (ROOT / "tests" / "__init__.py").exists()


def test_wheel_contains_only_sarformer_jax(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("sarformer_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {"sarformer_jax"}, tops
    for sub in ("kernels", "convert", "configs", "models", "sam", "data", "benchmarks"):
        assert f"sarformer_jax/{sub}/__init__.py" in names, sub
    assert "sarformer_jax/configs/tiny.py" in names
    assert not any(n.startswith(("sarformer_jax/tests", "tests/", "scripts/")) for n in names)
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        text = zipfile.ZipFile(wheel).read(top_level[0]).decode().split()
        assert text == ["sarformer_jax"], text


@pytest.mark.parametrize("name", ["kernels", "convert", "configs"])
def test_generic_names_not_importable_outside_repo(tmp_path, name):
    """Outside the checkout, `import NAME` must not find our folder.  Another distribution may
    own the name (transformers >= 5 installs Hugging Face's `kernels`): then it is theirs."""
    code = ("import importlib.util as u; s = u.find_spec(%r); "
            "print(s.origin if s and s.origin else '', *(s.submodule_search_locations or []) "
            "if s else [], sep='\\n')" % name)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    found = [pathlib.Path(p).resolve() for p in proc.stdout.splitlines() if p]
    ours = [p for p in found if p == ROOT or ROOT in p.parents]
    assert not ours, f"`import {name}` outside the repo finds our folder: {ours}"
    proc = subprocess.run([sys.executable, "-c", f"import sarformer_jax.{name}"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_base_install_needs_no_torch():
    deps = _pyproject()["project"]["dependencies"]
    assert not any(d.split("=")[0].split(">")[0].split("<")[0].strip() in ("torch", "torchvision")
                   for d in deps)
    test_extra = _pyproject()["project"]["optional-dependencies"]["test"]
    assert "torch==2.14.1" in test_extra and "torchvision==0.29.1" in test_extra


def test_import_needs_no_torch(tmp_path):
    code = ("import sys, sarformer_jax, sarformer_jax.cli, sarformer_jax.config, "
            "sarformer_jax.kernels, sarformer_jax.convert.common, sarformer_jax.configs.tiny; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
