"""NeMo 2.5's own ``load_context`` on NeMo 2 directories: what NeMo builds from ``context/``.

Run with the NeMo 2.5 environment of ``../shared/fixtures/nemo2_tiny_llama/README.md``
(nemo-toolkit pins transformers 4.53 and megatron-core 0.14, so it cannot share the
project's venv), after exporting with the project's own venv:

    tpo-convert hf-to-nemo --hf ../shared/fixtures/nemo2_tiny_llama/hf --out /tmp/ours
    ../nemo-venv/bin/python examples/nemo_interop/load_context.py \\
        ../shared/fixtures/nemo2_tiny_llama/nemo /tmp/ours

It prints, for each directory, the model and config classes NeMo instantiates from
``io.json`` and the config fields a Llama is made of, side by side with what NeMo's own
importer wrote. Weights are not loaded: NeMo's loader builds Transformer Engine layers,
which need a GPU (the weights are the megatron-core checkpoint the tests load).
"""

import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parents[3] / "shared/fixtures/nemo2_tiny_llama/tools/nemo_cpu_shims.py"
FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
          "num_query_groups", "seq_length", "rotary_base", "share_embeddings_and_output_weights",
          "normalization", "gated_linear_unit", "position_embedding_type", "add_bias_linear",
          "layernorm_epsilon", "make_vocab_size_divisible_by", "params_dtype", "bf16")

if __name__ == "__main__":
    exec(SHIMS.read_text())   # NeMo on a CPU machine: no TE, no modelopt, no CUDA
    from nemo.lightning.io import load_context

    for directory in sys.argv[1:]:
        model = load_context(Path(directory) / "context", subpath="model")
        config, tokenizer = model.config, model.tokenizer
        print(f"{directory}: {type(model).__name__}({type(config).__name__}), tokenizer "
              f"{type(tokenizer).__name__} of {tokenizer.vocab_size} tokens")
        for field in FIELDS:
            print(f"    {field} = {getattr(config, field, '<absent>')}")
