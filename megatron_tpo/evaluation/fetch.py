"""``tpo-eval fetch-sets``: the public evaluation sets, from the package index with pip.

AlpacaEval's 805 instructions with a reference answer each are in the *source archive*
of ``alpaca-eval`` (``example/outputs.json``, CC-BY-NC-4.0); MT-Bench's 80 questions and
GPT-4's 30 reference answers are in the ``flexeval`` wheel. Both archives are downloaded
by pip (no dependencies, nothing installed), the files checked against the digests
below and written under ``out_dir``. Nothing of them is committed to this repository.
"""

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Dict

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.evaluation.sets import ALPACA_EVAL_FILE, MT_BENCH_FILE, MT_BENCH_REFERENCE_FILE
from megatron_tpo.files import atomic_write

ALPACA_EVAL = "alpaca-eval==0.6.6"
FLEXEVAL = "flexeval==0.18.3"
_MT_BENCH_DIR = "flexeval/core/chat_dataset/chatbot_bench_datasets/"
# (archive member, file written, sha256 of the member as published in those releases)
SET_FILES = {
    ALPACA_EVAL: [("alpaca_eval-0.6.6/example/outputs.json", ALPACA_EVAL_FILE,
                   "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5")],
    FLEXEVAL: [(_MT_BENCH_DIR + "mt-en.jsonl", MT_BENCH_FILE,
                "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
               (_MT_BENCH_DIR + "mt-en-ref-gpt4.jsonl", MT_BENCH_REFERENCE_FILE,
                "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f")],
}
LICENCES = {ALPACA_EVAL_FILE: "CC-BY-NC-4.0 (AlpacaEval's evaluation set)",
            MT_BENCH_FILE: "MT-Bench questions as packaged in flexeval",
            MT_BENCH_REFERENCE_FILE: "MT-Bench GPT-4 reference answers as packaged in flexeval"}


def _download(requirement: str, directory: Path) -> Path:
    """The archive pip downloads for ``requirement``: the sdist of alpaca-eval (the example
    outputs are not in its wheel), the wheel of flexeval."""
    archive_kind = (["--no-binary", ":all:"] if requirement == ALPACA_EVAL
                    else ["--only-binary", ":all:"])
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(directory), *archive_kind, requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"pip download {requirement} failed (is the package index "
                          f"reachable?): {result.stderr.strip()[-500:]}")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".gz", ".whl", ".zip"))
    if not files:
        raise ConfigError(f"pip download {requirement} left no archive in {directory}")
    return files[0]


def _member(archive: Path, name: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as handle:
            return handle.read(name)
    with tarfile.open(archive) as handle:
        return handle.extractfile(name).read()


def fetch_sets(out_dir: Path) -> Dict[str, Path]:
    """Download both archives and write the set files into ``out_dir``; returns
    ``{file name: path}``. A member whose digest differs is refused, not written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for requirement, members in SET_FILES.items():
        with tempfile.TemporaryDirectory(prefix="tpo-eval-fetch-") as scratch:
            archive = _download(requirement, Path(scratch))
            for member, file_name, digest in members:
                data = _member(archive, member)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ConfigError(f"{archive.name}:{member}: sha256 differs from the "
                                      f"published {requirement}; not written")
                atomic_write(out_dir / file_name, lambda handle: handle.write(data))
                (out_dir / file_name).chmod(0o644)   # readable by every job of the cluster
                written[file_name] = out_dir / file_name
    notice = "\n".join(f"{name}: {LICENCES[name]}" for name in written)
    atomic_write(out_dir / "SOURCES.txt", lambda handle: handle.write(
        f"Fetched by tpo-eval fetch-sets from {ALPACA_EVAL} (sdist) and {FLEXEVAL} "
        f"(wheel); do not commit.\n{notice}\n".encode()))
    return written
