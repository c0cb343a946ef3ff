"""``tpo-doctor``: what this rank has, checked against what a GPU run needs.

    tpo-doctor                                   # versions, CUDA/NCCL, TE, vLLM, GPUs, env, /dev/shm
    tpo-doctor experiment=llama3_8b              # ... and whether that config's dry run fits
    tpo-doctor --world-size 32 experiment=llama3_70b
    srun --label tpo-doctor ...                  # one report per task (each rank's own view)
    tpo-doctor --json                            # machine-readable

Each check prints one line, ``ok|warn|FAIL  what  detail``. Versions are compared with
the pins of ``requirements/gpu.txt`` (``--pins`` for another file). On a host without
CUDA a missing GPU part (CUDA, vLLM, Transformer Engine) or a version off its pin is a
warning; where CUDA is visible, or with ``--expect-gpu``, it FAILs. Arguments that are
not options are tpo-run overrides: the config is composed, validated and dry-run for
``--world-size`` ranks (default: the ranks tpo-run would see here). Exit status: 0 when
nothing FAILs, 1 otherwise, 2 for bad options.
"""

import argparse
import importlib
import json
import os
import platform
import socket
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron_tpo.config.errors import ConfigError

OK, WARN, FAIL = "ok", "warn", "FAIL"
GIB = 1024 ** 3
DEFAULT_PINS = Path(__file__).resolve().parents[2] / "requirements" / "gpu.txt"
# Distributions checked against their pins, in report order; without torch and
# megatron-core nothing of tpo-run works, so those two FAIL when missing anywhere.
CHECKED_DISTRIBUTIONS = ("torch", "megatron-core", "transformers", "triton", "vllm",
                         "transformer-engine", "transformer-engine-torch")
REQUIRED_EVERYWHERE = ("torch", "megatron-core")
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES",
                         "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")
# Docker's default /dev/shm is 64 MiB: NCCL's shared-memory transport and the weight
# stream's shared-memory transport need far more than that.
SHM_WARN_BYTES = 1 * GIB
# Lines of the text report are wrapped to this many columns (details over continuation lines).
REPORT_WIDTH = 110


@dataclass
class Check:
    status: str
    what: str
    detail: str

    def line(self) -> str:
        """``status what detail``, a long detail (a dry run's refusal) wrapped under its
        own column so the report stays readable in a terminal and a job's log."""
        head = f"{self.status:<5} {self.what:<25} "
        width = max(REPORT_WIDTH - len(head), 40)
        pieces = []
        for paragraph in self.detail.splitlines():  # a list item keeps its indent
            indent = " " * (len(paragraph) - len(paragraph.lstrip()))
            pieces += textwrap.wrap(paragraph, width, subsequent_indent=indent and indent + "  ",
                                    break_on_hyphens=False) or [""]
        return head + ("\n" + " " * len(head)).join(pieces or [""])


def _missing(strict: bool) -> str:
    return FAIL if strict else WARN


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# -- pins and versions ----------------------------------------------------------------
def normalized(name: str) -> str:
    return name.split("[")[0].strip().lower().replace("_", "-").replace(".", "-")


def read_pins(path: Path) -> Dict[str, str]:
    """``name==version`` lines of a requirements/constraints file (comments, options and
    other specifiers skipped), by normalized distribution name."""
    pins = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[normalized(name)] = version.strip()
    return pins


def installed_version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def same_release(installed: str, pinned: str) -> bool:
    """2.14.0+cu130 is torch 2.14.0; NGC's 2.14.0a0+git... is not."""
    return installed.split("+", 1)[0] == pinned.split("+", 1)[0]


def check_versions(pins: Dict[str, str], strict: bool) -> List[Check]:
    checks = []
    for name in CHECKED_DISTRIBUTIONS:
        installed, pinned = installed_version(name), pins.get(name)
        if installed is None:
            status = FAIL if name in REQUIRED_EVERYWHERE else _missing(strict)
            checks.append(Check(status, name, f"not installed (pinned {pinned or 'nowhere'})"))
        elif pinned is None:
            checks.append(Check(WARN, name, f"{installed} installed; no pin for it"))
        elif same_release(installed, pinned):
            checks.append(Check(OK, name, f"{installed} (pinned {pinned})"))
        else:
            checks.append(Check(_missing(strict), name,
                                f"{installed} installed, pinned {pinned}: off the pin"))
    return checks


def check_python(pins_python: str = "3.12") -> Check:
    version = platform.python_version()
    if version.startswith(pins_python + "."):
        return Check(OK, "python", f"{version} ({sys.executable})")
    return Check(WARN, "python", f"{version}: the GPU pins were resolved for Python "
                                 f"{pins_python} ({sys.executable})")


# -- CUDA, NCCL, GPUs -----------------------------------------------------------------
def check_nccl(version: str, pinned: Optional[str]) -> Check:
    """torch's NCCL against the nvidia-nccl pin: another one (a site's NCCL preloaded, a
    container's) is not the one torch 2.14 was tested with."""
    if pinned is None:
        return Check(OK, "nccl", version)
    if version == pinned:
        return Check(OK, "nccl", f"{version} (pinned {pinned})")
    return Check(WARN, "nccl", f"{version} loaded, pinned {pinned} (LD_PRELOAD or LD_LIBRARY_PATH "
                               "bringing another libnccl?)")


def check_cuda(strict: bool, nccl_pin: Optional[str] = None) -> List[Check]:
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - the report says why, whatever it is
        return [Check(FAIL, "cuda", f"torch does not import: {_error_text(error)}")]
    built = torch.version.cuda
    if built is None:
        return [Check(_missing(strict), "cuda", f"torch {torch.__version__} is built without "
                                                "CUDA: no GPU run here")]
    if not torch.cuda.is_available():
        return [Check(_missing(strict), "cuda", f"torch built for CUDA {built}, but no device "
                      f"is visible (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")]
    checks = [Check(OK, "cuda", f"torch built for CUDA {built}; {torch.cuda.device_count()} "
                                "device(s) visible")]
    try:
        nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
        checks.append(check_nccl(nccl, nccl_pin))
    except Exception as error:  # noqa: BLE001
        checks.append(Check(FAIL, "nccl", f"torch.cuda.nccl.version() failed: {_error_text(error)}"))
    return checks + check_gpu_memory(torch)


def check_gpu_memory(torch) -> List[Check]:
    """Free and total memory per visible device; something else resident (another job, a
    stale process) leaves vLLM's gpu_memory_utilization share short at start-up."""
    checks = []
    for index in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(index)
        except Exception as error:  # noqa: BLE001
            checks.append(Check(FAIL, f"gpu {index}", _error_text(error)))
            continue
        name = torch.cuda.get_device_name(index)
        detail = f"{name}: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
        used = 1.0 - free / total
        checks.append(Check(WARN if used > 0.1 else OK, f"gpu {index}",
                            detail + (f" ({used:.0%} in use by something else)" if used > 0.1 else "")))
    return checks


# -- Transformer Engine, vLLM, the layer spec -----------------------------------------
def try_import(*modules: str) -> Optional[BaseException]:
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as error:  # noqa: BLE001 - TE raises AssertionError/RuntimeError
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return error
    return None


def check_import(what: str, modules: List[str], strict: bool) -> Check:
    error = try_import(*modules)
    if error is None:
        module = sys.modules[modules[0].split(".")[0]]
        return Check(OK, what, f"imports ({getattr(module, '__version__', 'no __version__')})")
    return Check(_missing(strict), what, f"does not import: {_error_text(error)}")


def check_layer_spec(strict: bool) -> Check:
    """Which megatron layer spec build_llama would use on this rank, and why."""
    try:
        from megatron_tpo.model import llama
    except Exception as error:  # noqa: BLE001
        return Check(FAIL, "layer spec", f"megatron_tpo.model.llama does not import: "
                                         f"{_error_text(error)}")
    try:
        choice = getattr(llama, "layer_spec_choice", None)
        if choice is not None:
            name, reason = choice()
        else:   # an older checkout: the same decision, from the one probe it had
            available = llama.transformer_engine_available()
            name = "transformer_engine" if available else "local"
            reason = "transformer_engine_available() is " + str(available)
    except Exception as error:  # noqa: BLE001 - a broken TE raises more than ImportError
        return Check(FAIL, "layer spec", f"choosing it raises {_error_text(error)} "
                                         "(so would every model build)")
    status = OK if "transformer" in name.lower() or not strict else WARN
    return Check(status, "layer spec", f"{name}: {reason}")


# -- environment ----------------------------------------------------------------------
def check_distributed_environment(environ=None) -> List[Check]:
    env = os.environ if environ is None else environ
    shown = " ".join(f"{key}={env[key]}" for key in DISTRIBUTED_VARIABLES if key in env)
    checks = [Check(OK, "environment", shown or "no launcher variables set (a single process)")]
    if env.get("CUDA_DEVICE_MAX_CONNECTIONS", "1") != "1":
        checks.append(Check(WARN, "environment", "CUDA_DEVICE_MAX_CONNECTIONS="
                            f"{env['CUDA_DEVICE_MAX_CONNECTIONS']}: megatron-core's overlap of "
                            "tensor-parallel communication needs 1"))
    threads = env.get("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads and threads.isdigit() and int(threads) > cores:
        checks.append(Check(WARN, "environment", f"OMP_NUM_THREADS={threads} but this task may "
                            f"use {cores} core(s): threads will spin against each other "
                            "(srun wants SRUN_CPUS_PER_TASK to pass --cpus-per-task on)"))
    return checks


def check_local_rank_device(environ=None) -> Optional[Check]:
    """vLLM takes cuda:LOCAL_RANK as it is; a site that binds one GPU per task leaves a
    single visible device, so every local rank but 0 would fail."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - reported by check_cuda
        return None
    if local is None or not local.isdigit() or count == 0:
        return None
    if int(local) >= count:
        return Check(FAIL, "device", f"local rank {local} but {count} visible device(s): "
                     "vLLM uses cuda:LOCAL_RANK; give each task all of its node's GPUs "
                     "(no --gpus-per-task / --gpu-bind=single)")
    return Check(OK, "device", f"local rank {local} -> cuda:{local} of {count}")


def check_shared_memory(path: str = "/dev/shm") -> Check:
    try:
        stats = os.statvfs(path)
    except OSError as error:
        return Check(WARN, path, f"cannot be read: {_error_text(error)}")
    total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    detail = f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
    if total < SHM_WARN_BYTES:
        return Check(WARN, path, detail + ": too small for NCCL's shared-memory transport "
                     "(docker run --shm-size=..., or --ipc=host)")
    return Check(OK, path, detail)


# -- the config's dry run ---------------------------------------------------------------
def check_dry_run(overrides: List[str], world_size: Optional[int]) -> Check:
    from megatron_tpo.cli import run
    from megatron_tpo.dry_run import dry_run
    from megatron_tpo.parallel import detect_distributed_env

    try:
        config = run.compose_config(overrides)
        options = {"--world-size": str(world_size)} if world_size else {}
        ranks, source = run.dry_run_world(config, options, detect_distributed_env())
        config.validate(ranks)
        sized = dry_run(config, ranks)
        sized.check()
    except ConfigError as error:
        return Check(FAIL, "dry run", f"does not fit or is not valid: {error}")
    return Check(OK, "dry run", f"fits on {ranks} rank(s) ({source}): {sized.summary()}")


# -- the whole report -----------------------------------------------------------------
def run_checks(args: argparse.Namespace) -> List[Check]:
    checks = [check_python()]
    strict = args.expect_gpu or _cuda_visible()
    try:
        pins = read_pins(args.pins)
    except OSError as error:
        checks.append(Check(WARN, "pins", f"{args.pins} cannot be read ({_error_text(error)}): "
                            "versions are not compared"))
        pins = {}
    else:
        checks.append(Check(OK, "pins", str(args.pins)))
    checks += check_versions(pins, strict)
    checks += check_cuda(strict, pins.get("nvidia-nccl-cu13"))
    checks.append(check_import("import transformer_engine",
                               ["transformer_engine", "transformer_engine.pytorch"], strict))
    checks.append(check_import("import vllm", ["vllm"], strict))
    checks.append(check_layer_spec(strict))
    checks += check_distributed_environment()
    device = check_local_rank_device()
    if device is not None:
        checks.append(device)
    checks.append(check_shared_memory())
    if args.overrides:
        checks.append(check_dry_run(args.overrides, args.world_size))
    return checks


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpo-doctor", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="tpo-run overrides: also dry-run that config")
    parser.add_argument("--world-size", type=_positive, help="ranks for the dry run "
                        "(default: the launcher's, or the model-parallel size)")
    parser.add_argument("--expect-gpu", action="store_true",
                        help="FAIL (not warn) on missing CUDA, TE, vLLM or an off-pin version, "
                             "as where CUDA is visible")
    parser.add_argument("--pins", type=Path, default=DEFAULT_PINS,
                        help=f"pins to compare with (default {DEFAULT_PINS})")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    checks = run_checks(args)
    failed = any(check.status == FAIL for check in checks)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    try:
        if args.json:
            print(json.dumps({"host": socket.gethostname(), "rank": rank, "ok": not failed,
                              "checks": [asdict(check) for check in checks]}, indent=2))
        else:
            print("\n".join(check.line() for check in checks))
    except BrokenPipeError:
        # `tpo-doctor | head` closed the pipe early; the verdict stands.
        sys.stdout = open(os.devnull, "w")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
