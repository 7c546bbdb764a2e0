"""Toy sequence-to-sequence data: the book's ``dataset.sequence`` API and its generators."""

from dataset import generate, sequence

__all__ = ["generate", "sequence"]
