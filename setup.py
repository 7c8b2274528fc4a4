"""Packaging hook (the rest is in pyproject.toml): the wheel carries the deploy's inputs as package data.

build_py copies functions/, infra/, cloudbuild.yaml and requirements.txt (kept at the repository's top, where Cloud
Build and the CI expect them) into dasklab/_inputs of the build, where dasklab/inputs.py finds them once installed.
An editable install (`pip install -e .`) copies nothing: there dasklab/inputs.py finds them in the checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TOP = Path(__file__).resolve().parent
NAMES = ("functions", "infra", "cloudbuild.yaml", "requirements.txt")  # dasklab/inputs.py NAMES


class BuildPyWithInputs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "dasklab" / "_inputs"
        shutil.rmtree(target, ignore_errors=True)
        for name in NAMES:
            source = TOP / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithInputs})
