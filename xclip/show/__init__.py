"""Figures, colours and the browser viewer."""
