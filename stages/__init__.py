import warnings

# fvcore (imported by detectron2) calls torch.jit.script at import time, which torch 2.14 deprecates:
# a third-party warning users can do nothing about, printed once per Ray worker.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
