import warnings

# Third-party deprecation notices users can do nothing about, printed once per Ray worker:
# fvcore (imported by detectron2) calls torch.jit.script at import; detectron2 calls torch.meshgrid without
# `indexing` and checks torch.fx tracing the old way.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch.meshgrid: in an upcoming release", category=UserWarning)
warnings.filterwarnings("ignore", message=r"is_fx_tracing will return true", category=UserWarning)
