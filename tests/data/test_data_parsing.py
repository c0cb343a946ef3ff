import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data import (GENERIC, SPECIFIC, ParseError, ParseFailure, ThoughtTemplate,
                               load_thought_template, parse_outputs, parse_thought_response)


def test_generic_output_splits_into_thought_and_response():
    text = ("Here is my thought process:\n- cacti like dry soil\n\n"
            "Here is my response:\nUse a gritty, well-draining mix.")
    parsed = parse_thought_response(text, GENERIC)
    assert parsed.thought == "- cacti like dry soil"
    assert parsed.response == "Use a gritty, well-draining mix."


def test_specific_output_splits_at_r():
    text = "Draft: 2+2=4. Evaluation: correct.\n<R>The answer is 4."
    parsed = parse_thought_response(text, SPECIFIC)
    assert parsed.thought == "Draft: 2+2=4. Evaluation: correct."
    assert parsed.response == "The answer is 4."


def test_empty_thought_is_allowed_but_the_response_is_not():
    assert parse_thought_response("<R> yes", SPECIFIC).thought == ""
    with pytest.raises(ParseError) as error:
        parse_thought_response("thinking...<R>   \n", SPECIFIC)
    assert error.value.reason is ParseFailure.EMPTY_RESPONSE


@pytest.mark.parametrize("text, reason", [
    ("I just answer without the marker.", ParseFailure.NO_RESPONSE_MARKER),
    ("draft <R> one <R> two", ParseFailure.REPEATED_RESPONSE_MARKER),
    ("Here is my response: a\nHere is my response: b", ParseFailure.REPEATED_RESPONSE_MARKER),
])
def test_bad_outputs_fail_with_their_reason(text, reason):
    template = SPECIFIC if "<R>" in text or "marker" in text else GENERIC
    with pytest.raises(ParseError) as error:
        parse_thought_response(text, template)
    assert error.value.reason is reason


def test_unicode_and_very_long_outputs():
    thought = "思考 " * 50_000 + "🙂"
    parsed = parse_thought_response(f"{thought}<R>Réponse: ça va — ✓", SPECIFIC)
    assert parsed.response == "Réponse: ça va — ✓"
    assert len(parsed.thought) == len(thought.strip())


def test_failures_are_counted_per_reason_and_dropped():
    texts = ["t<R>r1", "no marker", "a<R>b<R>c", "x<R> ", "also no marker", "t2<R>r2"]
    parsed, failures = parse_outputs(texts, SPECIFIC)
    assert [p.response if p else None for p in parsed] == ["r1", None, None, None, None, "r2"]
    assert failures == {"no_response_marker": 2, "repeated_response_marker": 1,
                        "empty_response": 1}


def test_paper_prompt_wording_and_rendering():
    rendered = GENERIC.user_message("Name a {color}.")
    assert rendered.startswith("Respond to the following user query in a comprehensive and "
                               "detailed way. You can write down your thought process")
    assert rendered.endswith("User query: Name a {color}.")
    assert 'write your final response after "<R>"' in SPECIFIC.user_message("x")


def test_user_template_from_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text('name: mine\nprompt: "Think, then answer after ANSWER:\\n{instruction}"\n'
                    'response_marker: "ANSWER:"\n')
    template = load_thought_template(path)
    assert parse_thought_response("hmm ANSWER: 42", template).response == "42"
    assert load_thought_template("system").system_prompt.startswith("You are a helpful")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nprompt: no placeholder\nresponse_marker: X\n")
    with pytest.raises(ConfigError, match="placeholder"):
        load_thought_template(bad)
    with pytest.raises(ConfigError, match="not found .shipped in configs/thought: direct, "
                                          "generic, specific, system; or a YAML path"):
        load_thought_template("nonexistent")
    with pytest.raises(ConfigError, match="response_marker is empty"):
        ThoughtTemplate(name="x", prompt="{instruction}").validate()
