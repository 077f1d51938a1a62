"""Layer-wise OBS from calibration inputs alone: SparseGPT, OBC (ExactOBS) and Wanda, driven block by block."""
