"""The install routes agree: the conda environment of the authors' release's name installs what `make install` does."""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).parents[1]


def test_conda_env_installs_what_make_install_does():
    text = (ROOT / "conda_env.yml").read_text()
    assert re.search(r"^name: pytorch_sac_ae$", text, re.M)  # `source activate pytorch_sac_ae`, as in the release
    pins = re.findall(r"^\s+- (.+?)\s*$", text.split("- pip:", 1)[1], re.M)
    makefile = (ROOT / "Makefile").read_text()
    make_pin = re.search(r"^TORCH_PIN := (\S+)$", makefile, re.M)[1]
    make_extras = re.search(r"-e '(\.\[\w+\])'", makefile)[1]
    assert pins == [make_pin, f"-e {make_extras}"]
    python = re.search(r"^\s+- python=(\d+)\.(\d+)$", text, re.M)
    if tomllib is not None:
        requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
        minimum = tuple(int(p) for p in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())
        assert (int(python[1]), int(python[2])) >= minimum
