"""A tiny GGUF file written with the ``gguf`` package, laid out as llama.cpp's converter
writes one, for the GGUF conversion tests and the documents' commands."""

import torch

from megatron_tpo.model import llama_layout as layout

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _gguf_permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's query/key row order (convert_hf_to_gguf.py's ``permute``)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def byte_level_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + ["he", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(alphabet) + 1) + [3, 3]  # 3 marks control (special) tokens
    return tokens, types


def write_tiny_gguf(path, hf_model) -> None:
    """An F32 GGUF of ``hf_model`` (a tiny ``LlamaForCausalLM``) with a byte-level BPE
    tokenizer and a ChatML template, laid out as llama.cpp's converter writes it."""
    import gguf

    config = hf_model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(groups)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    tokens, types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHATML)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = hf_model.state_dict()
    writer_tensors = {"token_embd.weight": state[layout.HF_EMBEDDING],
                      "output_norm.weight": state[layout.HF_FINAL_NORM]}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            tensor = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                tensor = _gguf_permuted(tensor, heads if gguf_name == "attn_q" else groups)
            writer_tensors[f"blk.{layer}.{gguf_name}.weight"] = tensor
    for name, tensor in writer_tensors.items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
