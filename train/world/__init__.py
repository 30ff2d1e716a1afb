"""The synthetic shapes world: where hallucination is measurable without downloading data.

Scenes of 1-4 big coloured shapes on a plain background (scene.py), their pictures (render.py), the
ground-truth language about them (describe.py, questions.py), controlled corruptions of that language
(hallucinate.py), an exact programmatic judge (claims.py reads, judge.py checks), and writers for the
training files in the real LLaVA / LLaVA-RLHF formats (export.py) and for shapes versions of
MMHal-Bench and POPE (benchmarks.py); data_cli.py is `factedge data`. Nothing here imports torch.
Import from the modules (`from factedge.train.world.judge import judge`); the package re-exports
nothing, so `factedge.train.world.judge` stays the module.
"""
