"""The loop the experiment scripts share: each checkpoint's model, evaluated under fixed threads."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from posbias import checkpoint as ckpt
from posbias.config import fixed_threads
from posbias.model import TransformerLM


def each_model(paths: list[str], threads: int, said: list[str]) -> Iterator[tuple[TransformerLM, int, Callable[[str], None]]]:
    """``(model, train_len, say)`` for each checkpoint in ``paths``, the model in eval mode, under
    ``threads`` intra-op threads and without gradients; ``say(line)`` appends the line, with the
    seconds that checkpoint took, to ``said`` and prints it."""
    with fixed_threads(threads), torch.no_grad():
        for path in paths:
            t0 = time.perf_counter()

            def say(line: str) -> None:
                said.append(f"{line} ({time.perf_counter() - t0:.0f} s)")
                print(said[-1], flush=True)

            yield ckpt.load_model(path).eval(), ckpt.train_len(path), say
