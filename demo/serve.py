"""The app's entry point: builds the page on import and starts nothing; `main` serves it.

app.py (what Hugging Face Spaces, `python app.py` and `gradio app.py` run) and the console
script `envlf serve` both come here. Importing this module builds the page (`demo`) and
starts nothing: no model is loaded, no process or thread is started, no file is written, so
a spawned worker process, a reload and Spaces can import it safely. The start-up
(demo.startup) begins when main() launches the app, or on the first page view when something
else launches `demo`. Settings: demo/config.py (flags over environment variables).
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
