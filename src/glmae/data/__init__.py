"""Data: formats, preprocessing with a disk cache, checks and `glmae info`."""
