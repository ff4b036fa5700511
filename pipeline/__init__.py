"""Unsupervised object discovery and detector self-training.

Python API: ``from pipeline import discover, load_detector``.
``discover("photo.jpg", method="maskcut")`` -> boxes and masks of one image (``pipeline/api.py``);
``det = load_detector("runs/selftrain/.../round2"); out = det(rgb)`` -> boxes, masks, scores.
"""


def __getattr__(name):
    # Lazy: importing the package must not pull in detectron2, torch or Ray.
    if name == "load_detector":
        from stages.detect import load_detector

        return load_detector
    if name == "discover":
        from pipeline.api import discover

        return discover
    raise AttributeError(name)
