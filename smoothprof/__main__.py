"""``python -m smoothprof``: the same as the ``smoothprof`` command."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="smoothprof")
