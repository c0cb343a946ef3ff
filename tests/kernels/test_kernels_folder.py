"""The repository's top-level ``kernels/`` folder must not hide Hugging Face's ``kernels``
package (which transformers 5 imports when it is installed) from a script run at the
repository root, where Python puts the current directory first on the path."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_hugging_face_kernels_is_installed_so_the_next_test_means_something():
    assert metadata.version("kernels")   # transformers requires it


@pytest.mark.slow
def test_transformers_imports_from_the_repository_root():
    # "-c" puts the working directory first on sys.path, as `python -` and notebooks do.
    script = ("import kernels, megatron_tpo.kernels as ours\n"
              "from transformers import LlamaForCausalLM\n"
              "print(kernels.__file__)\nprint(ours.__file__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hub, ours = done.stdout.split()
    assert "site-packages" in hub and not hub.startswith(str(ROOT / "kernels"))
    assert Path(ours).parent == ROOT / "kernels" / "dpo_logprob"
