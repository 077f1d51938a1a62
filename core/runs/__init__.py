"""Runs: a spec + a model + data → pruned model, masks, curve and report, resumable from checkpoints."""
