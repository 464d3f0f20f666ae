"""Grounding metrics, first-order baselines, faithfulness, comparisons and the synthetic world."""
