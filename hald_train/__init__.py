"""hald_train: a thin trainer with HALD's Soft-Hard-Soft schedule (see README)."""
