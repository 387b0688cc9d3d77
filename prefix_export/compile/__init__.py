"""The compile step, after export: fusions (fusions.py), reduced precisions (quantize.py), their checks
(agreement.py) and the step that ties them into a shipped folder (pipeline.py)."""
