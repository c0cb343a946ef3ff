"""Write a chosen plan as Hydra configs and the matching ``#SBATCH`` header."""

from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

from megatron_tpo.plan.cost.engines import EngineSearch
from megatron_tpo.plan.search.training import TrainingPlan
from megatron_tpo.plan.workload import Workload

PARALLEL_FILE = "parallel.yaml"
TRAINER_FILE = "trainer.yaml"
ROLLOUT_FILE = "rollout.yaml"
SBATCH_FILE = "sbatch_header.sh"


def _write_yaml(path: Path, comment: str, values: Dict) -> None:
    path.write_text(f"# {comment}\n" + OmegaConf.to_yaml(OmegaConf.create(values)))


def emit_plan(directory: Path, workload: Workload, plan: TrainingPlan,
              engines: List[EngineSearch], job_name: str) -> List[Path]:
    """Write the files into ``directory`` (created if needed); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    layout, cluster = plan.layout, workload.cluster
    origin = (f"written by tpo-plan for {workload.model.name} on {cluster.nodes} x "
              f"{cluster.gpus_per_node} {cluster.gpu_name}: {layout.label()}")

    parallel = layout.parallel_config()
    parallel_path = directory / PARALLEL_FILE
    _write_yaml(parallel_path, origin, {
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": parallel.virtual_pipeline_model_parallel_size,
        "context_parallel_size": parallel.context_parallel_size,
        "sequence_parallel": parallel.sequence_parallel,
    })

    trainer_path = directory / TRAINER_FILE
    full = layout.recompute == "full"
    _write_yaml(trainer_path, origin, {
        "seq_length": workload.seq_len,
        "global_batch_size": workload.global_batch,
        "micro_batch_size": layout.micro_batch,
        # DPOTrainingConfig's knob: a micro-batch holds whole pairs (runnable.py).
        "micro_batch_pairs": layout.micro_batch // 2,
        "recompute_granularity": None if layout.recompute == "none" else layout.recompute,
        "recompute_method": "uniform" if full else None,
        "recompute_num_layers": 1 if full else None,
        "fp8": "hybrid" if layout.fp8 else None,
    })
    paths = [parallel_path, trainer_path]

    if engines:
        rollout_path = directory / ROLLOUT_FILE
        _write_yaml(rollout_path, origin, {
            engine.role: {"model": engine.model_name,
                          "tensor_parallel_size": engine.plans[0].tp,
                          "replicas_per_node": engine.plans[0].replicas_per_node}
            for engine in engines if engine.plans
        })
        paths.append(rollout_path)

    sbatch_path = directory / SBATCH_FILE
    # One task per GPU: megatron_tpo.parallel.launch reads SLURM_PROCID/SLURM_NTASKS.
    sbatch_path.write_text("\n".join([
        "#!/bin/bash",
        f"# {origin}",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={cluster.nodes}",
        f"#SBATCH --ntasks-per-node={cluster.gpus_per_node}",
        f"#SBATCH --gpus-per-node={cluster.gpus_per_node}",
        "#SBATCH --exclusive",
        "",
    ]))
    return paths + [sbatch_path]
