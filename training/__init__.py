"""Labels, datasets, pretraining, finetuning, evaluation and export (built in later issues)."""
