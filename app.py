"""EnVLF Gradio app: text->image and image->text search with attention maps and relevance feedback.

    python app.py                                   # embedded demo world (built on first start)
    python app.py --checkpoint runs/ucm-lite4/best --index indexes/ucm
    python app.py --checkpoint user/envlf-ucm --gallery ../shared/datasets/ucm-captions
    ENVLF_CHECKPOINT=... ENVLF_INDEX=... gradio app.py   # reload mode

Settings: demo/config.py (flags over environment variables). Hugging Face Spaces runs this
file as is: `demo` is built at import, `launch` runs only under __main__.
"""

import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from demo.backend import BackendError, load_backend  # noqa: E402
from demo.config import load_config  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
for noisy in ("httpx", "httpcore", "urllib3", "faiss"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

config = load_config()
try:
    backend = load_backend(config)
except BackendError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None

# Gradio is imported once the backend stands: a bad checkpoint, index or feedback file is
# reported without waiting for Gradio to load.
from demo.handlers import Handlers  # noqa: E402
from demo.layout import launch, make_app  # noqa: E402

handlers = Handlers(backend)
demo = make_app(handlers)

if __name__ == "__main__":
    launch(demo, backend)
