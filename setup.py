"""Package discovery, so no list of packages is kept by hand (a new subpackage is found, not missed).

Everything else is in pyproject.toml. This file exists because setuptools' ``[tool.setuptools.packages.find]``
names packages after their directories and cannot rename one: ``firmware-sim/`` is the package ``firmware_sim``
(pyproject's ``package-dir``), so it and its subpackages are discovered here under that name.
"""

from setuptools import find_packages, setup

FIRMWARE_SIM_DIR = "firmware-sim"

setup(packages=[
    *find_packages(include=["gateway", "gateway.*", "drivers", "drivers.*", "pipeline", "pipeline.*"]),
    "firmware_sim",
    *(f"firmware_sim.{name}" for name in find_packages(FIRMWARE_SIM_DIR)),
])
