"""megatron-tpo: Thought Preference Optimization on megatron-core."""

__version__ = "0.1.0"
