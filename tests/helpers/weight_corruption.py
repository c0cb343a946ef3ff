"""One tensor delivered wrong by a weight sync, and what the parity check must then say."""

CORRUPTED = "model.layers.2.mlp.up_proj.weight"


def corrupted_stream(stream):
    """``stream``'s (name, tensor) pairs with CORRUPTED shifted by 0.05, as a broken
    transport or loader would deliver them."""
    return ((name, tensor + 0.05 if name == CORRUPTED else tensor) for name, tensor in stream)


def assert_corrupted_tensor_named(message: str, rank: int) -> None:
    """The parity check's error names CORRUPTED, and the trainer rank that found it."""
    assert ("first tensor whose checksum differs between what was sent and what the "
            f"engine holds: {CORRUPTED} (rank {rank})") in message, message
