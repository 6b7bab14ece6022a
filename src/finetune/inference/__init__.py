"""What predict, evaluate and export share: loading a trained checkpoint, and exporting it."""
