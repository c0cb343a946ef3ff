"""What a run reports: metrics (JSONL, TensorBoard, W&B), per-iteration plots, the summary."""
