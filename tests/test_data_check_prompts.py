import json
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
