"""python -m jaxpaged.convert MODEL: convert a checkpoint once into the cache and print the entry path."""
from __future__ import annotations

import argparse
import sys

from jaxpaged.config import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpaged.convert",
        description="Convert a Hugging Face directory, a .gguf file or a built-in model (smollm2-135m-instruct) "
                    "to JAX params and store them in the cache (one .npy per param), so later loads skip conversion.")
    parser.add_argument("model", help="HF model directory, .gguf file, or built-in name")
    parser.add_argument("--dtype", default="float32", help=f"parameter dtype: {' | '.join(DTYPES)}")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $JAXPAGED_CACHE or ~/.cache/jaxpaged)")
    parser.add_argument("--force", action="store_true", help="rebuild the entry even if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from jaxpaged.convert.cache import ensure_cached

    try:
        entry = ensure_cached(args.model, args.dtype, args.cache_dir, progress=not args.no_progress,
                              force=args.force)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
