"""The engine facade, its results, panel layouts and what the model read."""
