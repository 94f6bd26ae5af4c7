"""Federated methods: FedPuReL and the baselines it is compared with.

Each module registers its method(s) and their own config with
:data:`fedpurel_app.registry.METHODS`; ``method.name`` in the run config
selects one, :func:`~fedpurel_app.methods.base.build_method` makes it for a
run. A new method is one module here (a :class:`~fedpurel_app.methods.base.Method`
subclass) plus its line in the registry's list of built-in modules.
"""
