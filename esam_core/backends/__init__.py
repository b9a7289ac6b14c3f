"""Prompt backends: what answers E-SAM's point prompts (see ``esam_core.types.PromptBackend``)."""
