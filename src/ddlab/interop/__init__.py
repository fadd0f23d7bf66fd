"""Interoperability with diffusers: its UNets as ddlab models, its schedulers as ddlab samplers,
ddlab models exported as diffusers pipelines. diffusers is imported only when these are used."""
