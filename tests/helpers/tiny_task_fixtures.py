"""For the tiny arithmetic task's tests: the smallest model its assets are built for."""

MODEL_YAML = """name: test_tiny
num_layers: 1
hidden_size: 32
ffn_hidden_size: 64
num_attention_heads: 4
num_query_groups: 2
vocab_size: 1
max_position_embeddings: 256
make_vocab_size_divisible_by: 1
"""
