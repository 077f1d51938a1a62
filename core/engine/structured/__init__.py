"""Structured pruning: whole neurons, channels or heads removed, and the model physically shrunk (groups · saliency ·
shrink · prune)."""
