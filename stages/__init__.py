import logging
import warnings

# Third-party deprecation notices users can do nothing about, printed once per Ray worker:
# fvcore (imported by detectron2) calls torch.jit.script at import; detectron2 calls torch.meshgrid without
# `indexing`.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch.meshgrid: in an upcoming release", category=UserWarning)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# torch logs this once per process (a logging record, not a warning) when detectron2's ROI pooler asks
# whether it is being traced the old way; nothing in this project traces.
logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropMessage("is_fx_tracing will return true"))
