"""samout-edge: SamOut (cummax-attention) language models from PyTorch to edge GPUs."""

__version__ = "0.1.0"
