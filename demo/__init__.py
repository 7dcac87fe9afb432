"""The Gradio app (python app.py / envlf serve): config, layout, handlers, backend, start-up.

Imports of envlf's model, index and search inside these modules' functions are deferred on
purpose: the page must be served within seconds of `python app.py`, before torch, timm and
transformers are loaded (they take ~10 s on 2 cores), and while the default model is still
being built by a child process (demo.startup, envlf.bootstrap).
"""
