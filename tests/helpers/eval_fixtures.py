"""For the tpo-eval tests: a scripted pairwise judge (a judge model whose verdicts follow
a rule and which keeps every prompt it was shown), and AlpacaEval's own metrics."""

import importlib.metadata
import re
import sys
import types

import pytest

from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine

JUDGE_PROMPT = "{instruction}\n<A>{response_a}</A>\n<B>{response_b}</B>"


class ShorterWinsJudgeEngine(RolloutEngine):
    """A scripted judge model: the shorter response wins (A on a tie), one prompt in
    ``unreadable_every`` gets no verdict; every prompt it is shown is kept."""

    def __init__(self, unreadable_every=0):
        self.prompts, self.unreadable_every = [], unreadable_every

    def generate(self, prompts, sampling):
        outputs = []
        for prompt in prompts:
            self.prompts.append(prompt)
            a = re.search(r"<A>(.*)</A>", prompt, re.S).group(1)
            b = re.search(r"<B>(.*)</B>", prompt, re.S).group(1)
            verdict = "[[A]]" if len(a) <= len(b) else "[[B]]"
            if self.unreadable_every and len(self.prompts) % self.unreadable_every == 0:
                verdict = "I cannot decide."
            outputs.append(GenerationOutput(prompt=prompt, texts=[f"reasoning. {verdict}"],
                                            num_tokens=[2]))
        return outputs

    def update_weights(self, stream):
        raise NotImplementedError


def alpaca_eval_metrics():
    """alpaca_eval's metrics modules; it imports pkg_resources, which setuptools >= 81 no
    longer ships, for two version helpers the metrics never call: a stand-in serves them
    while alpaca_eval imports, and leaves sys.modules after (pytest's monkeypatch takes a
    pkg_resources it finds there for setuptools' and fails on the stand-in)."""
    try:
        import pkg_resources  # noqa: F401
        stood_in = False
    except ImportError:
        from packaging.version import parse

        stand_in = types.ModuleType("pkg_resources")
        stand_in.parse_version = parse
        stand_in.get_distribution = lambda name: types.SimpleNamespace(
            version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = stand_in
        stood_in = True
    try:
        pytest.importorskip("alpaca_eval")
        from alpaca_eval.metrics import glm_winrate, winrate
    finally:
        if stood_in:
            del sys.modules["pkg_resources"]   # alpaca_eval keeps its own reference
    return winrate, glm_winrate
