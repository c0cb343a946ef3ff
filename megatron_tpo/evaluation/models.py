"""Which weights are evaluated: an HF directory, a megatron distributed checkpoint, or
iteration t of a ``tpo-run`` directory, each turned into an HF directory the engines load.

A dist checkpoint (``tpo-convert hf-to-dist`` output, a NeMo 2 directory, a training
checkpoint's ``dist/``) carries no config.json or tokenizer: the HF policy directory
gives both (``run.policy``, as for ``tpo-run``'s ``run.initial_checkpoint``). Its shapes
are checked against that config before anything is written; a mismatch names the tensor.
Converted weights are cached under the evaluation's directory (``models/<name>``), whole
or not at all, and reused by a re-run.

A run directory's M_t is the training checkpoint saved at the end of iteration t - 1
(``state.json``'s loop state ``{"iteration": t, "step_in_iteration": 0}``); M_0 is the
run's ``run.initial_checkpoint`` or ``run.policy``.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tpo.config.errors import ConfigError

DIST_MARKER = "metadata.json"          # megatron-core writes it last into a dist checkpoint


@dataclass(frozen=True)
class ModelSource:
    """``name`` labels the model in annotations and exports (AlpacaEval's ``generator``);
    ``weights`` is where its weights are (an HF directory or a dist checkpoint); ``policy``
    the HF directory with its config.json and tokenizer (``weights`` itself for HF)."""

    name: str
    weights: Path
    policy: Path

    @property
    def is_hf(self) -> bool:
        return self.weights == self.policy


def is_dist_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / DIST_MARKER).is_file() or (path / "weights" / DIST_MARKER).is_file()


def model_source(path: str, policy: Optional[str] = None,
                 name: Optional[str] = None) -> ModelSource:
    """``path`` as an HF directory or a dist checkpoint (which needs ``policy``)."""
    weights = Path(path)
    label = name or weights.name
    if (weights / "config.json").is_file():
        return ModelSource(label, weights, weights)
    if is_dist_checkpoint(weights):
        if not policy:
            raise ConfigError(f"{weights}: a megatron dist checkpoint carries no config.json "
                              "or tokenizer; set run.policy=<HF directory of the same model>")
        return ModelSource(label, weights, Path(policy))
    raise ConfigError(f"{weights}: neither an HF model directory (config.json) nor a megatron "
                      f"dist checkpoint ({DIST_MARKER})")


def _loop_state(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / "state.json").read_text()).get("loop_state", {})
    except (OSError, json.JSONDecodeError):
        return {}


def run_model_source(run_dir: Path, iteration: int) -> ModelSource:
    """M_``iteration`` of a tpo-run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: missing; is {run_dir} a tpo-run directory?")
    run = json.loads(config_path.read_text())["run"]
    if iteration < 0:
        raise ConfigError(f"--iteration={iteration}: must be >= 0")
    if iteration == 0:
        if run.get("initial_checkpoint"):
            return ModelSource("M_0", Path(run["initial_checkpoint"]), Path(run["policy"]))
        return ModelSource("M_0", Path(run["policy"]), Path(run["policy"]))
    from megatron_tpo.checkpoint.manifest import read_manifest

    found = {}
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        state = _loop_state(step_dir)
        if state.get("step_in_iteration") == 0 and read_manifest(step_dir) is not None:
            found[state.get("iteration")] = step_dir
    if iteration not in found:
        kept = ", ".join(f"M_{t}" for t in sorted(found)) or "none"
        raise ConfigError(f"{run_dir}: no complete checkpoint of M_{iteration} (the end of "
                          f"iteration {iteration - 1}); kept: {kept} (checkpoint.keep_last "
                          "prunes older ones)")
    return ModelSource(f"M_{iteration}", found[iteration] / "dist", Path(run["policy"]))


def _dist_tensors(source: ModelSource, verify_checksums: bool):
    """(raw HF config, ModelConfig, reader, HF-named tensor source) of a dist checkpoint,
    its shapes checked against the policy's config.json."""
    from megatron_tpo.checkpoint.initial import weights_directory
    from megatron_tpo.model.dist_weights import DistWeightsReader
    from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict
    from megatron_tpo.model.nemo import NemoTensorSource

    raw = read_hf_config_dict(source.policy)
    model = model_config_from_hf(raw, str(source.policy / "config.json"))
    reader = DistWeightsReader(weights_directory(str(source.weights)), model.num_layers,
                               verify_checksums=verify_checksums)
    tensors = NemoTensorSource(reader, model)
    try:
        tensors.check_shapes()
    except ConfigError as error:
        raise ConfigError(f"{source.weights} does not match its config "
                          f"{source.policy / 'config.json'}: {error}") from error
    return raw, model, reader, tensors


def check_model_source(source: ModelSource) -> None:
    """Before any work: the weights are there and, for a dist checkpoint, every tensor has
    the shape the policy's config.json implies (metadata only)."""
    if not source.is_hf:
        _dist_tensors(source, verify_checksums=False)
    elif not (source.weights / "config.json").is_file():
        raise ConfigError(f"{source.weights}: no config.json; not an HF model directory")


def verify_run_checkpoint(source: ModelSource) -> None:
    """COLLECTIVE. A training checkpoint's files against its manifest (every rank)."""
    from megatron_tpo.checkpoint.manifest import read_manifest, verify_files

    step_dir = source.weights.parent
    manifest = read_manifest(step_dir) if source.weights.name == "dist" else None
    if manifest is not None:
        verify_files(step_dir, manifest)


def hf_directory(source: ModelSource, cache_dir: Path, progress: bool = True) -> Path:
    """An HF directory holding ``source``'s weights: itself, or its conversion cached under
    ``cache_dir/<name>`` (written to a scratch name, then renamed). Run on one rank."""
    if source.is_hf:
        return source.weights
    target = Path(cache_dir) / source.name
    stamp = target / "tpo_source.json"
    origin = str(source.weights.resolve())
    if (target / "config.json").is_file() and stamp.is_file() and \
            json.loads(stamp.read_text()).get("weights") == origin:
        return target
    from megatron_tpo.model import llama_layout as layout
    from megatron_tpo.model.conversion import write_hf_directory

    raw, model, reader, tensors = _dist_tensors(source, verify_checksums=True)
    embedding = reader.tensors[reader.prefix + layout.EMBEDDING]
    dtype = str(embedding.properties.dtype).removeprefix("torch.")
    scratch = target.with_name(f".{target.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    write_hf_directory(tensors, model, dtype, scratch, base_config=raw, tokenizer_dir=source.policy,
                       progress=progress, direction=f"{source.name}: dist -> hf",
                       source=str(source.weights))
    stamp_text = json.dumps({"weights": origin, "policy": str(source.policy)}).encode()
    (scratch / "tpo_source.json").write_bytes(stamp_text)
    scratch.rename(target)
    return target
