"""flux2bench: what each FLUX.2 setup costs on this hardware, measured from the real diffusers pipeline."""

__version__ = "0.1.0"
