"""The search server and its web UI (`jaxmr serve`): a Litestar app (app.py) over the engine (engine.py)."""
