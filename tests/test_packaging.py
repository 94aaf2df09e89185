"""The wheel holds every clipjax package, the Pallas kernels as `clipjax.kernels`, and the assets."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_list_covers_the_source_tree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"clipjax"} | {f"clipjax.{d}" for d in os.listdir(os.path.join(ROOT, "clipjax"))
                           if os.path.exists(os.path.join(ROOT, "clipjax", d, "__init__.py"))}
    assert listed == found | {"clipjax.kernels"}, f"pyproject.toml packages differ: {sorted(listed ^ found)}"


def test_wheel_ships_kernels_and_assets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()  # a copy: building writes build/ and *.egg-info into the source tree
    for name in ("pyproject.toml", "README.md", "clipjax", "kernels"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                      if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = [p for p in os.listdir(tmp_path / "dist") if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / "dist" / wheel).namelist())
    assert "clipjax/kernels/contrastive.py" in names and "clipjax/kernels/__init__.py" in names
    assert "clipjax/assets/bpe_simple_vocab_16e6.txt.gz" in names
    assert not any(n.startswith(("kernels/", "tests/", "experiments/", "benchmarks/")) for n in names)
