"""Hallucination evaluation (MMHal-Bench, POPE) and fidelity of bundles and PyTorch models.

`factedge eval` lives here. The bundle path (mmhal, pope, judges, report, backends.EdgeBackend) needs
only factedge.edge + numpy/pillow, so it runs on a base install; torch is imported only by the
PyTorch reference backend and the fidelity check, and only when they are used.
"""
