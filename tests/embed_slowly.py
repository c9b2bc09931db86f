"""`tools/embed.py` with a pause before every chunk, so that a test can kill it mid-run (changes timing only).

python tests/embed_slowly.py PAUSE_SECONDS [tools/embed.py arguments...]
"""

import importlib.util
import pathlib
import sys
import time

import vitally_jax.embedding.screen as embed_screen

PAUSE = float(sys.argv[1])
_embed_chunk = embed_screen._embed_chunk


def _slow_chunk(*args, **kwargs):
    time.sleep(PAUSE)
    return _embed_chunk(*args, **kwargs)


if __name__ == "__main__":
    embed_screen._embed_chunk = _slow_chunk
    spec = importlib.util.spec_from_file_location(
        "embed_tool", pathlib.Path(__file__).resolve().parent.parent / "tools" / "embed.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sys.exit(tool.main(sys.argv[2:]))
