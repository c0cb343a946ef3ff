"""parts.TPOParts as the dry run gets it: build_tpo with the stand-in builders on a tiny
run holds the stand-ins, the run's instructions, its digest and store, and one field can
be replaced (as the dry run shortens the held-out set) keeping every other part."""

import dataclasses
import json

import pytest

from tiny_hf import tiny_tokenizer
from tpo_fixtures import tiny_run_overrides, write_instructions

from megatron_tpo.build import build_tpo
from megatron_tpo.cli.run import compose_config
from megatron_tpo.data.storage import config_hash
from megatron_tpo.dry_run import (STAND_INS, StandInCheckpointer, StandInEngine, StandInTrainer,
                                  StandInWeightPush)
from megatron_tpo.judge.base import Judge
from megatron_tpo.parts import TPOParts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny_tokenizer().save_pretrained(root / "policy")   # the stand-ins need no weights
    write_instructions(root / "train.jsonl", 64, seed=1)
    write_instructions(root / "heldout.jsonl", 8, seed=2)
    config = compose_config(tiny_run_overrides(root))
    return root, config, build_tpo(config, STAND_INS, world_size=1)


def _instructions(path):
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines()]


def test_the_parts_hold_the_stand_ins_and_the_runs_inputs(built):
    root, config, parts = built
    assert isinstance(parts, TPOParts) and parts.config is config
    assert (type(parts.engine), type(parts.trainer), type(parts.checkpointer),
            type(parts.weights)) == (StandInEngine, StandInTrainer, StandInCheckpointer,
                                     StandInWeightPush)
    assert isinstance(parts.judge, Judge)
    assert sorted(parts.prompts) == sorted(_instructions(root / "train.jsonl"))
    assert parts.heldout == _instructions(root / "heldout.jsonl")[:4]
    assert parts.digest == config_hash(config.digest_fields())
    assert parts.store.root == root / "run" / "stages"
    assert parts.engine_tensor_parallel_size == 1
    assert parts.tokenizer.eos_token_id == tiny_tokenizer().eos_token_id


def test_replacing_one_part_keeps_every_other(built):
    _, _, parts = built
    shorter = dataclasses.replace(parts, heldout=parts.heldout[:2])
    assert shorter.heldout == parts.heldout[:2]
    for field in dataclasses.fields(TPOParts):
        if field.name != "heldout":
            assert getattr(shorter, field.name) is getattr(parts, field.name), field.name
