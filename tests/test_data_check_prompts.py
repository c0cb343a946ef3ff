import json
import subprocess
import sys
from pathlib import Path

from megatron_tpo.data.check_prompts import main

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
from tiny_hf import tiny_tokenizer  # noqa: E402


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
    assert main([str(config), "--tokenizer", str(tmp_path / "tok")]) == 1
    assert "prompts.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_show_iteration_prints_that_iterations_own_first_prompt(tmp_path, capsys):
    from megatron_tpo.data import (GENERIC, iteration_prompts, load_prompt_set_config,
                                   load_prompts)

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
                 "--show-iteration", "2"]) == 1
    assert "iteration 2 needs prompts [4, 6) but the set has 4" in capsys.readouterr().err
