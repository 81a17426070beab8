"""An attention-pattern plugin: the strided pattern of the Sparse Transformer (Child et al. 2019, section
4.2), causal. With w = `[model] sliding_window`, a query attends the w positions up to and including itself,
and every w-th position before those: a key d positions back is seen when d < w or d is a multiple of w.
Two layers of it reach every earlier position, at O(T·(w + T/w)) pairs instead of O(T²).

Used as `[model] attention = "example_attention"` once this package is installed, or as
`attention = "attention.py:PATTERN"` with this file beside the project file.
"""

from __future__ import annotations

from gptcli.attention import AttentionPattern, MaskContext


def strided_mask(context: MaskContext):
    """Bool (T, S): True where a query may attend a key."""
    distance = context.distance  # (T, S): how far back each key is
    window = context.config.sliding_window
    return (distance >= 0) & ((distance < window) | (distance % window == 0))  # (T, S)


PATTERN = AttentionPattern(
    name="example_attention",
    description="causal and strided (Sparse Transformer): the sliding_window positions before each query, and "
                "every sliding_window-th one before those",
    mask=strided_mask,
)
