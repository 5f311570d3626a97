"""Adapters for real checkpoints: SmolLM2 from a registry package (more to come: GLM-4-Voice, Step-Audio-2)."""
