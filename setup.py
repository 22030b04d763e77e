"""Build glue: maps the architecture folders to `epd.*` import names and
compiles the protos during the build (generated code is never committed)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))
from epd.layout import FOLDERS  # the folder -> import-name table, kept once


def discover_packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for name, folder in FOLDERS.items():
        package_dir[name] = folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            packages.append(".".join([name, *rel.parts]))
    return packages, package_dir


class BuildWithProtos(build_py):
    """Generates epd/v1/*_pb2*.py from protos/ before copying the sources."""

    def run(self) -> None:
        from epd.protogen import generate

        generate(force=True)
        super().run()


packages, package_dir = discover_packages()
setup(packages=packages, package_dir=package_dir, cmdclass={"build_py": BuildWithProtos},
      package_data={"epd.operator": ["*.yaml"]}, include_package_data=True)
