"""Family-agnostic attribution math: quadrature rules, transformer blocks and the interaction engine."""
