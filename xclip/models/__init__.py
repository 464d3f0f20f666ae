"""Model families (one adapter each), loading, model names, random test models and the shipped checkpoints."""
