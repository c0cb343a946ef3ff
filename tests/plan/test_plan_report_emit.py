"""plan/report/emit.py: a chosen plan written as configs that load back to its layout,
a trainer file with its batch and recomputation, the engines' sizes and an #SBATCH
header for the cluster."""

from omegaconf import OmegaConf

from megatron_tpo.config import load_model_config, load_parallel_config
from megatron_tpo.plan.cost.engines import plan_engines
from megatron_tpo.plan.hardware import find_gpu
from megatron_tpo.plan.report.emit import emit_plan
from megatron_tpo.plan.search.training import estimate_plan
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload


def _workload():
    return Workload(load_model_config("llama3_70b"),
                    Cluster("h100-80gb", find_gpu("h100-80gb"), 4, 8), 4096, 256, Assumptions())


def test_the_files_hold_the_plans_layout_batch_and_cluster(tmp_path):
    workload = _workload()
    layout = TrainingLayout(tp=4, pp=4, vpp=5, cp=1, dp=2, micro_batch=2, recompute="full",
                            fp8=True)
    engines = [plan_engines("policy", workload.model, workload.cluster, 4096, 0.9)]
    paths = emit_plan(tmp_path / "plan", workload, estimate_plan(workload, layout), engines,
                      job_name="tpo-llama3_70b")
    assert [p.name for p in paths] == ["parallel.yaml", "trainer.yaml", "rollout.yaml",
                                       "sbatch_header.sh"]
    origin = ("# written by tpo-plan for llama3_70b on 4 x 8 h100-80gb: "
              "TP4 PP4 VPP5 CP1 DP2 MBS2 rc=full fp8")
    assert paths[0].read_text().splitlines()[0] == origin
    parallel = load_parallel_config(paths[0])
    assert parallel == layout.parallel_config()
    assert (parallel.tensor_model_parallel_size, parallel.virtual_pipeline_model_parallel_size,
            parallel.sequence_parallel) == (4, 5, True)
    assert OmegaConf.to_container(OmegaConf.load(paths[1])) == {
        "seq_length": 4096, "global_batch_size": 256, "micro_batch_size": 2,
        "micro_batch_pairs": 1, "recompute_granularity": "full", "recompute_method": "uniform",
        "recompute_num_layers": 1, "fp8": "hybrid"}
    best = engines[0].plans[0]
    assert OmegaConf.to_container(OmegaConf.load(paths[2])) == {
        "policy": {"model": "llama3_70b", "tensor_parallel_size": best.tp,
                   "replicas_per_node": best.replicas_per_node}}
    assert paths[3].read_text().splitlines() == [
        "#!/bin/bash", origin, "#SBATCH --job-name=tpo-llama3_70b", "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive"]


def test_without_engines_or_recomputation(tmp_path):
    workload = _workload()
    layout = TrainingLayout(tp=8, pp=2, vpp=1, cp=1, dp=2, micro_batch=4, recompute="none",
                            fp8=False)
    paths = emit_plan(tmp_path, workload, estimate_plan(workload, layout), [], job_name="j")
    assert [p.name for p in paths] == ["parallel.yaml", "trainer.yaml", "sbatch_header.sh"]
    assert load_parallel_config(paths[0]).virtual_pipeline_model_parallel_size is None
    trainer = OmegaConf.load(paths[1])
    assert (trainer.micro_batch_pairs, trainer.recompute_granularity, trainer.recompute_method,
            trainer.fp8) == (2, None, None, None)
