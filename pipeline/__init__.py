"""Unsupervised object discovery and detector self-training.

Downstream use of a produced detector: ``from pipeline import load_detector``;
``det = load_detector("runs/selftrain/.../round2"); out = det(rgb)`` -> boxes, masks, scores.
"""


def __getattr__(name):
    # Lazy: importing the package must not pull in detectron2.
    if name == "load_detector":
        from stages.detector import load_detector

        return load_detector
    raise AttributeError(name)
