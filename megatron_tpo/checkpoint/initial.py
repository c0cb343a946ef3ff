"""M_0 from a megatron-core dist checkpoint (``run.initial_checkpoint``), at any TP/PP.

``tpo-convert hf-to-dist`` writes such a checkpoint once; a NeMo 2 directory holds one
under ``weights/``. The trainer is built as usual and every rank then reads its own
slices through ``dist_checkpointing``, so no per-rank copy of M_0 is converted for the
run's layout. ``run.policy`` still gives config.json, the tokenizer and the rollout
engine, whose weights the loop replaces with the trainer's before the first rollout.

    check_initial_checkpoint(path, config.model)          # TPOConfig.validate, every rank
    load_initial_checkpoint(trainer.ddp_chunks, trainer.optimizer, path)   # collective
"""

from pathlib import Path
from typing import List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig

NEMO2_WEIGHTS = "weights"


def weights_directory(path: str) -> Path:
    """The dist checkpoint at ``path``: the directory itself, or a NeMo 2 directory's
    ``weights/``."""
    nemo_weights = Path(path) / NEMO2_WEIGHTS
    return nemo_weights if (nemo_weights / "metadata.json").is_file() else Path(path)


def _reader(path: str, num_layers: int, verify_checksums: bool):
    from megatron_tpo.model.dist_weights import DistWeightsReader

    reader = DistWeightsReader(weights_directory(path), num_layers,
                               verify_checksums=verify_checksums)
    if not reader.stacked:
        # megatron's sharded_state_dict asks for stacked layers; per-layer keys never match.
        raise ConfigError(f"{reader.weights_dir}: layers are stored one key per layer; "
                          "write the checkpoint with tpo-convert hf-to-dist")
    return reader


def check_initial_checkpoint(path: str, model: ModelConfig) -> None:
    """The checkpoint exists, its files are all there and long enough, and every tensor
    has the shape ``model`` implies. Reads metadata only (checksums are checked by the
    load), so every rank of a large job can afford it before any work."""
    from megatron_tpo.model.nemo import NemoTensorSource

    if not Path(path).is_dir():
        raise ConfigError(f"run.initial_checkpoint={path}: no such directory (write one with "
                          "tpo-convert hf-to-dist)")
    try:
        reader = _reader(path, model.num_layers, verify_checksums=False)
        NemoTensorSource(reader, model).check_shapes()
    except ConfigError as error:
        raise ConfigError(f"run.initial_checkpoint={path}: {error}") from error


def _checksum_problem(path: str, num_layers: int) -> Optional[str]:
    try:
        _reader(path, num_layers, verify_checksums=True)
    except ConfigError as error:
        return str(error)
    return None


def load_initial_checkpoint(chunks: List, optimizer, path: str,
                            timeout_seconds: float = 4 * 3600.0) -> None:
    """COLLECTIVE. Load M_0 into this rank's (DDP-wrapped) chunks at their TP/PP/VPP.

    Rank 0 first checks the files against the checksums ``tpo-convert`` wrote (minutes
    for a 70B checkpoint: the others wait for it on the store, up to ``timeout_seconds``,
    ``run.rank_zero_timeout_seconds``, not in a collective), and every rank raises its
    error, so no rank is left waiting in the load. The optimizer was built from the
    weights before the load, so its main (fp32) copies are refreshed.
    """
    from megatron_tpo.checkpoint.sharded_state import unwrapped_chunks
    from megatron_tpo.model.dist_weights import load_into_model
    from megatron_tpo.parallel.collectives import rank_zero_result

    models = unwrapped_chunks(chunks)
    num_layers = models[0].config.num_layers
    problem = rank_zero_result(lambda: _checksum_problem(path, num_layers),
                               f"checking {path} against its checksums", timeout_seconds,
                               "run.rank_zero_timeout_seconds")
    if problem is not None:
        raise ConfigError(f"run.initial_checkpoint={path}: {problem}")
    prefix = _reader(path, num_layers, verify_checksums=False).prefix
    for gpt_model in models:
        load_into_model(gpt_model, weights_directory(path), prefix)
    optimizer.reload_model_params()
