"""The Litestar search server and its web UI (`jaxmr serve`); it arrives with the index (issues 6 and 7)."""
