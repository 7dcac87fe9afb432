"""EnVLF Gradio app: text->image and image->text search with attention maps and relevance feedback.

    python app.py                                   # embedded demo world (built in the background on a first start)
    python app.py --checkpoint runs/ucm-lite4/best --index indexes/ucm
    python app.py --checkpoint user/envlf-ucm --gallery ../shared/datasets/ucm-captions
    ENVLF_CHECKPOINT=... ENVLF_INDEX=... gradio app.py   # reload mode

Settings: demo/config.py (flags over environment variables). Importing this file builds the
page (`demo`) and starts nothing: no model is loaded, no process or thread is started, no
file is written, so a spawned worker process, `gradio app.py` and Hugging Face Spaces can
import it safely. The start-up (demo.startup) begins when the app is launched below, or on
the first page view when something else launches `demo`.
"""

import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from demo.config import load_config  # noqa: E402
from demo.handlers import Handlers  # noqa: E402
from demo.layout import launch, make_app  # noqa: E402
from demo.startup import Startup  # noqa: E402

config = load_config()
startup = Startup(config)
handlers = Handlers(startup)
demo = make_app(handlers)


def main() -> int:
    from demo.backend import BackendError, check_feedback_file

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # what can be checked in a moment is checked before the page goes up
        config.home.mkdir(parents=True, exist_ok=True)
        check_feedback_file(config.feedback)
        startup.prepare_now()
    except (BackendError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    startup.start()
    launch(demo, startup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
