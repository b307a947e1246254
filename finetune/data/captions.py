"""Tag captions as kohya's sd-scripts trains them ('sks, 1girl, red hair, smile'): `data.shuffle_tags`
reorders the tags each step, `data.tag_dropout` leaves each out with its probability, and the first
`data.keep_tokens` tags (a trigger word, a character name) are never moved or dropped. The model then
ties the concept to the kept tags rather than to one fixed order of the rest.

The generator is the caller's, seeded by (seed, image index, epoch): the same item gets the same
caption in any DataLoader worker and in a resumed run.
"""

from __future__ import annotations

import numpy as np

JOIN = ", "


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags, stripped of surrounding whitespace; empty ones ('a,,b', a trailing comma) dropped."""
    return [tag for tag in (t.strip() for t in caption.split(separator)) if tag]


def vary_tags(caption: str, rng: np.random.Generator, *, shuffle: bool, keep: int = 0, dropout: float = 0.0,
              separator: str = ",") -> str:
    """`caption` with its tags after the first `keep` shuffled (`shuffle`) and each dropped with
    probability `dropout`, shuffled first then dropped as kohya does; joined with ', '."""
    tags = split_tags(caption, separator)
    kept, rest = tags[:keep], tags[keep:]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    if dropout > 0:
        rest = [tag for tag, u in zip(rest, rng.random(len(rest))) if u >= dropout]
    return JOIN.join(kept + rest)


def step_caption(caption: str, cfg, rng: np.random.Generator) -> str:
    """`caption` with its tags varied as the data config `cfg` (shuffle_tags, keep_tokens, tag_dropout,
    tag_separator) says."""
    return vary_tags(caption, rng, shuffle=cfg.shuffle_tags, keep=cfg.keep_tokens, dropout=cfg.tag_dropout,
                     separator=cfg.tag_separator)
