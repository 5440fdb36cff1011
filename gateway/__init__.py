"""canarygate: an OpenAI-compatible gateway that rolls tuned checkpoints out behind a base model."""

__version__ = "0.1.0"
