"""Interoperability with diffusers (imported lazily: ``pip install 'ddlab[interop]'``).

* :class:`DiffusersUNet2D` — diffusers' ``UNet2DModel`` behind ddlab's ``model(x, t, y)`` contract
  (``model=diffusers_unet2d``, ``experiment=butterflies_tutorial``).
* :mod:`ddlab.interop.schedulers` — diffusers' schedulers as ddlab samplers (``sampler=diffusers``).
* :mod:`ddlab.interop.pipelines` — ddlab runs with a diffusers UNet exported as diffusers pipelines.
"""

from .diffusers_models import DiffusersUNet2D, require_diffusers

__all__ = ["DiffusersUNet2D", "require_diffusers"]
