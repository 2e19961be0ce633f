"""Label alignment cost as image tokens grow: vlmtune's `align` against plain `difflib`, in one run.

Labels are carried from the plain tokenisation of the chat text (one placeholder per image) to the
processor's ids (each placeholder expanded to the image's tokens: 10k+ for a large image in Qwen2-VL or a
tiled Idefics3 image). The baseline runs `difflib.SequenceMatcher` over the two sequences as they are
(what vlmtune did before); `align` collapses runs of one repeated image token and matches the common
prefix and suffix directly. Both must map every text token to the same place; the table shows time per row and how it
grows when the image tokens double.

    python bench/align_bench.py [--text_tokens 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import difflib
import platform
import random
import time
from datetime import date

from vlmtune.data.encode import align

IMAGE = 7  # the image token id; text ids are drawn from 100..5099


def sequences(text_tokens: int, image_tokens: int, images: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Plain ids (one placeholder per image, spread through the text) and the processor's expansion."""
    rng = random.Random(seed)
    plain, expanded = [], []
    chunk = text_tokens // (images + 1)
    for _ in range(images):
        words = [rng.randrange(100, 5100) for _ in range(chunk)]
        plain += words + [IMAGE]
        expanded += words + [IMAGE] * (image_tokens // images)
    words = [rng.randrange(100, 5100) for _ in range(chunk)]
    return plain + words, expanded + words


def baseline(plain: list[int], expanded: list[int]) -> dict[int, int]:
    matcher = difflib.SequenceMatcher(None, plain, expanded, autojunk=False)
    return {a + i: b + i for a, b, n in matcher.get_matching_blocks() for i in range(n)}


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{date.today()}, {platform.machine()}, {platform.python_version()}, text tokens {args.text_tokens}")
    print("| image tokens | images | difflib ms | align ms | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for image_tokens, images in ((1024, 1), (4096, 1), (16384, 1), (32768, 1), (65536, 1), (131072, 1), (16384, 4)):
        plain, expanded = sequences(args.text_tokens, image_tokens, images)
        text = [i for i, tok in enumerate(plain) if tok != IMAGE]  # image tokens are never labelled
        ours, theirs = align(plain, expanded, {IMAGE}), baseline(plain, expanded)
        if [ours.get(i) for i in text] != [theirs.get(i) for i in text]:
            raise SystemExit(f"mappings differ at {image_tokens} image tokens")
        slow = timed(lambda a=plain, b=expanded: baseline(a, b), args.repeats)
        fast = timed(lambda a=plain, b=expanded: align(a, b, {IMAGE}), args.repeats)
        print(f"| {image_tokens} | {images} | {slow:.1f} | {fast:.2f} | {slow / fast:.0f}x |")


if __name__ == "__main__":
    main()
