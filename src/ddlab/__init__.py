"""ddlab: pixel-space image diffusion research framework."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import ddlab` stays light
    if name == "load_pretrained":
        from ddlab.hub import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ddlab' has no attribute {name!r}")
