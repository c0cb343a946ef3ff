import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data import (GENERIC, IterationStore, PromptFileError, PromptSetConfig,
                               apply_thought_chat_template, iteration_prompts,
                               load_prompt_set_config, load_prompts, load_thought_template)

from tiny_hf import tiny_tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


RECORDS = [{"instruction": "the cat", "id": 0}, {"instruction": "", "id": 1},
           {"instruction": "the cat", "id": 2}, {"instruction": "  ", "id": 3},
           {"instruction": "a b c d e f g h", "id": 4}, {"instruction": "dog", "id": 5},
           {"instruction": "sun moon", "id": 6}]
CLEAN = ["the cat", "dog", "sun moon"]   # empty, duplicate and too long (8 tokens) dropped


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "arrow", "saved"])
def test_load_clean_and_filter(tmp_path, tokenizer, suffix):
    path = tmp_path / f"prompts.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, RECORDS)
    elif suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    elif suffix == "saved":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(path)
    else:
        with pa.ipc.new_stream(path, pa.Table.from_pylist(RECORDS).schema) as writer:
            writer.write_table(pa.Table.from_pylist(RECORDS))
    config = PromptSetConfig(path=str(path), field="instruction", max_tokens=4)
    assert load_prompts(config, tokenizer) == CLEAN


def test_field_is_selectable(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "sun", "instruction": "moon"}])
    assert load_prompts(PromptSetConfig(path=str(path), field="question"), tokenizer) == ["sun"]


def _write_prompts_as_a_stage(path, tokenizer, output):
    """Load the prompt file while the stage is being written, so the write is reached
    whether or not the load succeeds."""

    def rows():
        for prompt in load_prompts(PromptSetConfig(path=str(path)), tokenizer):
            yield {"prompt": prompt}

    return IterationStore(output).write(0, "rollouts", rows(), seed=0, config_digest="x")


def test_bad_json_on_line_7_is_named_and_nothing_is_written(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"instruction": f"p{i}"}) for i in range(6)] + ['{"instruction": "p6",']
    path.write_text("\n".join(lines) + "\n")
    output = tmp_path / "run"
    with pytest.raises(PromptFileError, match=r"bad\.jsonl:7: not valid JSON"):
        _write_prompts_as_a_stage(path, tokenizer, output)
    assert not output.exists()
    # The same write with the line fixed does write: the assertion above can fail.
    path.write_text("\n".join(lines[:6] + ['{"instruction": "p6"}']) + "\n")
    assert _write_prompts_as_a_stage(path, tokenizer, output)["rows"] == 7
    assert IterationStore(output).read(0, "rollouts")[6] == {"prompt": "p6"}


def test_missing_field_is_named_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "missing.jsonl"
    write_jsonl(path, [{"instruction": "a"}, {"instruction": "b"}, {"prompt": "c"}])
    with pytest.raises(PromptFileError, match=r"missing\.jsonl:3: missing field 'instruction'"):
        load_prompts(PromptSetConfig(path=str(path)), tokenizer)
    write_jsonl(path, [{"instruction": 5}])
    with pytest.raises(PromptFileError, match=r"missing\.jsonl:1: field 'instruction' is int"):
        load_prompts(PromptSetConfig(path=str(path)), tokenizer)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "x"}]), parquet)
    with pytest.raises(PromptFileError, match=r"p\.parquet: no column 'instruction'"):
        load_prompts(PromptSetConfig(path=str(parquet)), tokenizer)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(PromptSetConfig(path=str(tmp_path / "nope.jsonl")), tokenizer)


def test_iteration_slices_are_disjoint_and_reproducible():
    prompts = [f"prompt {i}" for i in range(100)]
    slices = [iteration_prompts(prompts, t, per_iteration=30, seed=7) for t in range(3)]
    assert all(len(s) == 30 for s in slices)
    assert len(set().union(*map(set, slices))) == 90
    assert slices[1] == iteration_prompts(prompts, 1, per_iteration=30, seed=7)
    assert slices[0] != iteration_prompts(prompts, 0, per_iteration=30, seed=8)
    assert slices[0] != prompts[:30]          # shuffled, not the file's order
    with pytest.raises(ConfigError, match=r"iteration 3 needs prompts \[90, 120\)"):
        iteration_prompts(prompts, 3, per_iteration=30, seed=7)


def test_llama3_chat_template_around_the_thought_prompt(tokenizer):
    text = apply_thought_chat_template(tokenizer, "Name a cat.", GENERIC)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    + GENERIC.user_message("Name a cat.")
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    system = apply_thought_chat_template(tokenizer, "Name a cat.", load_thought_template("system"))
    assert system.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                             "You are a helpful assistant.")
    assert "<|start_header_id|>user<|end_header_id|>\n\nName a cat.<|eot_id|>" in system


def test_a_tokenizer_without_chat_template_is_refused():
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        apply_thought_chat_template(bare, "x", GENERIC)


def test_corrupt_parquet_is_named(tmp_path, tokenizer):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(PromptFileError, match=r"corrupt\.parquet: cannot be read as parquet"):
        load_prompts(PromptSetConfig(path=str(path)), tokenizer)


def test_bad_prompt_settings():
    with pytest.raises(ConfigError, match="prompts.path is empty"):
        PromptSetConfig().validate()
    with pytest.raises(ConfigError, match="min_tokens=5"):
        PromptSetConfig(path="x.jsonl", min_tokens=5, max_tokens=2).validate()
    config = load_prompt_set_config("ultrafeedback")
    assert (config.field, config.prompts_per_iteration) == ("prompt", 5000)
    with pytest.raises(ConfigError, match="prompts_per_iteration=0"):
        load_prompt_set_config("ultrafeedback", prompts_per_iteration=0)
