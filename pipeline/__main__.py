import os
import sys

# Weights only ever come from local files. Set before anything imports huggingface_hub (through timm),
# which reads the variable once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.cli import main  # noqa: E402

sys.exit(main())
