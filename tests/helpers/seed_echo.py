"""An engine stand-in that shows which seed each sample was drawn with: for the tests of
how replicas, a pool's ranks and chunked requests deal and seed samples."""

from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine
from megatron_tpo.rollout.vllm_engine import request_seeds


class SeedEcho(RolloutEngine):
    """Answers each sample with ``"<prompt> @ <seed>"``, the seed an engine draws it with
    (``request_seeds``); scores a sequence by its length. Records what it was asked."""

    def __init__(self):
        self.asked = []

    def generate(self, prompts, sampling):
        self.asked.append(list(prompts))
        seeds, n = request_seeds(sampling.seed, len(prompts), sampling.n), sampling.n
        return [GenerationOutput(prompt=prompt, texts=[f"{prompt} @ {seed}" for seed in
                                                       seeds[index * n:(index + 1) * n]],
                                 num_tokens=[1] * n)
                for index, prompt in enumerate(prompts)]

    def score(self, token_ids):
        self.asked.append([list(ids) for ids in token_ids])
        return [[float(len(ids))] for ids in token_ids]

    def update_weights(self, stream):
        raise NotImplementedError
