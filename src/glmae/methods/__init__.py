"""Pre-training and fine-tuning methods. Importing this package registers their configs."""
