"""PLACEHOLDER: being written by the stories helper. Interface: demo_documents(split) -> Iterator[str]."""
from typing import Iterator


def demo_documents(split: str) -> Iterator[str]:
    for i in range(200 if split == "train" else 20):
        yield f"Once upon a time there was a cat number {i}. The cat was happy."
