"""One training run: the run folder, its callbacks (LP-FT, EMA, TTA, figures, predictions), loggers and scaling."""
