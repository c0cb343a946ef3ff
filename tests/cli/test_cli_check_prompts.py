import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tpo.cli.check_prompts import main

from tiny_hf import tiny_tokenizer


def write_setup(tmp_path, lines):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = tmp_path / "prompts.yaml"
    config.write_text(f"path: {data}\nfield: instruction\nmax_tokens: 3\n"
                      "prompts_per_iteration: 2\nseed: 1\n")
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    return config


def test_report_and_first_prompt(tmp_path, capsys):
    lines = [json.dumps({"instruction": t}) for t in
             ["the cat", "dog", "dog", "", "a b c d e", "sun", "moon is here"]]
    config = write_setup(tmp_path, lines)
    assert main([str(config), "--tokenizer", str(tmp_path / "tok"), "--show-iteration", "1"]) == 0
    out = capsys.readouterr().out
    assert "read: 7\ndropped_empty_or_duplicate: 2\ndropped_by_token_length: 1\nkept: 4\n" \
           "full_iterations: 2\n" in out
    assert "<|start_header_id|>user<|end_header_id|>\n\nRespond to the following" in out


def test_bad_line_is_reported_with_exit_code(tmp_path, capsys):
    config = write_setup(tmp_path, [json.dumps({"instruction": "a"}), "{oops"])
    assert main([str(config), "--tokenizer", str(tmp_path / "tok")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tpo-check-prompts: error: ")
    assert "prompts.jsonl:2: not valid JSON" in error


@pytest.mark.slow
def test_show_iteration_prints_that_iterations_own_first_prompt(tmp_path, capsys):
    from megatron_tpo.data import GENERIC, iteration_prompts, load_prompt_set_config, load_prompts

    instructions = [f"{animal} {digit}" for animal in ("cat", "dog", "sun", "moon")
                    for digit in "0123"]
    config = write_setup(tmp_path, [json.dumps({"instruction": t}) for t in instructions])
    tokenizer = tiny_tokenizer()
    # What training will be given: every iteration's slice of the cleaned prompt set.
    prompts = load_prompts(load_prompt_set_config(config), tokenizer)
    assert len(prompts) == 16
    slices = [iteration_prompts(prompts, t, per_iteration=2, seed=1) for t in range(8)]
    for iteration in (3, 6):
        first = slices[iteration][0]
        assert all(first not in s for s in slices[:iteration] + slices[iteration + 1:])
        arguments = [str(config), "--tokenizer", str(tmp_path / "tok"),
                     "--show-iteration", str(iteration)]
        if iteration == 3:
            assert main(arguments) == 0
            out = capsys.readouterr().out
        else:  # once through the installed console script, as a user runs it
            script = Path(sys.executable).parent / "tpo-check-prompts"
            out = subprocess.run([str(script)] + arguments, check=True, capture_output=True,
                                 text=True).stdout
        expected = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    + GENERIC.user_message(first)
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert out.endswith(expected + "\n"), out
        shown = [p for p in instructions if GENERIC.user_message(p) in out]
        assert shown == [first]


def test_show_iteration_past_the_prompt_set_is_an_error(tmp_path, capsys):
    config = write_setup(tmp_path, [json.dumps({"instruction": f"cat {d}"}) for d in "0123"])
    assert main([str(config), "--tokenizer", str(tmp_path / "tok"),
                 "--show-iteration", "2"]) == 2
    assert "iteration 2 needs prompts [4, 6) but the set has 4" in capsys.readouterr().err


def write_data(path, field, instructions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in instructions))
    return path


@pytest.fixture()
def tokenizer_dir(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ultrafeedback", "configs/prompts/ultrafeedback",
                                  "configs/prompts/ultrafeedback.yaml"])
def test_a_shipped_config_is_found_by_name_or_by_its_path_in_the_checkout(
        tmp_path, monkeypatch, capsys, tokenizer_dir, form):
    # configs/prompts/ultrafeedback.yaml reads data/ultrafeedback_prompts.jsonl, field
    # "prompt", 5000 per iteration: run from a folder that has it.
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "data" / "ultrafeedback_prompts.jsonl", "prompt",
               [f"cat {n}" for n in range(5000)] + ["cat 1", ""])
    assert main([form, "--tokenizer", tokenizer_dir]) == 0
    assert "read: 5002\ndropped_empty_or_duplicate: 2\ndropped_by_token_length: 0\n" \
           "kept: 5000\nfull_iterations: 1\n" in capsys.readouterr().out


def test_an_unknown_config_name_lists_the_known_ones(tokenizer_dir, capsys):
    assert main(["configs/prompts/ultrafeedbak", "--tokenizer", tokenizer_dir]) == 2
    assert "unknown prompts config 'ultrafeedbak'; known: tiny, ultrafeedback" \
        in capsys.readouterr().err


def test_a_prompt_file_is_checked_with_the_options_as_its_settings(tmp_path, capsys,
                                                                   tokenizer_dir):
    data = write_data(tmp_path / "heldout.jsonl", "question", ["cat", "dog", "sun", "moon"])
    assert main([str(data), "--field", "question", "--prompts-per-iteration", "2",
                 "--iterations", "2", "--tokenizer", tokenizer_dir]) == 0
    assert "kept: 4\nfull_iterations: 2" in capsys.readouterr().out


def test_a_set_too_small_for_the_iterations_asked_is_refused_after_its_counts(
        tmp_path, capsys, tokenizer_dir):
    data = write_data(tmp_path / "few.jsonl", "instruction", ["cat", "dog", "sun"])
    assert main([str(data), "--tokenizer", tokenizer_dir]) == 2  # 5000 per iteration
    captured = capsys.readouterr()
    assert "kept: 3\nfull_iterations: 0\n" in captured.out
    assert ("few.jsonl: 3 usable prompts give 0 full iterations of "
            "prompts_per_iteration=5000, fewer than --iterations 1") in captured.err
    assert main([str(data), "--prompts-per-iteration", "1", "--iterations", "4",
                 "--tokenizer", tokenizer_dir]) == 2
    assert "give 3 full iterations" in capsys.readouterr().err


def test_write_stores_the_kept_prompts_for_prompts_path(tmp_path, capsys, tokenizer_dir):
    from megatron_tpo.data import load_prompts

    source = tmp_path / "source.parquet"
    rows = ["the cat", "dog", "dog", "", "a b c d e", "sun"]
    __import__("datasets").Dataset.from_dict({"prompt": rows}).to_parquet(str(source))
    written = tmp_path / "data" / "prompts.jsonl"
    assert main([str(source), "--field", "prompt", "--max-tokens", "3",
                 "--prompts-per-iteration", "1", "--tokenizer", tokenizer_dir,
                 "--write", str(written)]) == 0
    assert f"wrote 3 prompts to {written}" in capsys.readouterr().out
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert lines == [{"prompt": "the cat"}, {"prompt": "dog"}, {"prompt": "sun"}]
    # What a run reads from it is what was checked.
    from megatron_tpo.data.config import PromptSetConfig
    assert load_prompts(PromptSetConfig(path=str(written), field="prompt", max_tokens=3,
                                        prompts_per_iteration=1), tiny_tokenizer()) \
        == ["the cat", "dog", "sun"]


def test_a_missing_tokenizer_is_an_error_naming_the_option(tmp_path, capsys):
    data = write_data(tmp_path / "p.jsonl", "instruction", ["cat"])
    assert main([str(data), "--tokenizer", str(tmp_path / "no_such_policy")]) == 2
    assert f"--tokenizer {tmp_path / 'no_such_policy'}: no tokenizer there" \
        in capsys.readouterr().err
