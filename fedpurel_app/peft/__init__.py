"""PEFT variants behind one interface (:class:`~fedpurel_app.peft.base.PeftVariant`).

One module per variant, each registering itself and its own config with
:data:`fedpurel_app.registry.PEFT_VARIANTS`. A new variant is one module here
plus its line in the registry's list of built-in modules.
"""
