import os
import sys

# Weights only ever come from local files. Set before anything imports huggingface_hub (through timm),
# which reads the variable once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Huge pages for torch's CPU buffers of 2 MB and more (read once, at the first allocation; Ray's local
# workers inherit it). Without it every 3600-node graph (52 MB) is zeroed and faulted in 4 KB pages, about
# 16 ms on this project's 2-core CPU, a tenth of MaskCut's fast discovery step.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from pipeline.cli import main  # noqa: E402

sys.exit(main())
