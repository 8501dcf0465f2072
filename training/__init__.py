"""Training, data preparation, evaluation and export for CustomContrast."""
