"""EnVLF Gradio app: text->image and image->text search with attention maps and relevance feedback.

    python app.py                                   # embedded demo world (built in the background on a first start)
    python app.py --checkpoint runs/ucm-lite4/best --index indexes/ucm
    python app.py --checkpoint user/envlf-ucm --gallery ../shared/datasets/ucm-captions
    ENVLF_CHECKPOINT=... ENVLF_INDEX=... gradio app.py   # reload mode
    envlf serve ...                                 # the same, from the console script

The app lives in demo/serve.py (settings: demo/config.py). Importing this file builds the
page (`demo`) and starts nothing, so spawned workers, `gradio app.py` and Spaces import it
safely.
"""

from demo.serve import config, demo, handlers, main, startup  # noqa: F401  (Spaces looks for `demo`)

if __name__ == "__main__":
    raise SystemExit(main())
