"""fedpurel's command-line tools (the ``fedpurel`` command): not part of the Flower app.

They run on the machine that starts runs, never on a SuperNode, so the FAB
does not ship them: the comparison runner and its report and plots, the
merge of presets and overrides for ``scripts/run.sh``, the staged copy of
the app for ``flwr run``, node data folders, dataset statistics, and the
run config's section of ``pyproject.toml``.
"""
