"""Build step of the wheel beyond pyproject.toml: the runs shipped with the book (book/reference,
book/followups) are copied into the package as d2r_lib/_book/, so that chapters 7 and 8 find them
in an installed wheel (Colab) as well (d2r_lib/shipped.py)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("reference", "followups")


class BuildPyWithShippedRuns(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # -e .: the checkout's book/ is read directly
            return
        for name in SHIPPED:
            src, dst = Path("book") / name, Path(self.build_lib) / "d2r_lib" / "_book" / name
            if not src.is_dir():
                raise SystemExit(f"setup.py: {src} is missing; build from a checkout or an sdist")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithShippedRuns})
