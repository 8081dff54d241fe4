"""The server application (`python -m serve.app`, the same as `jaxmr serve`) and a UI screenshot tool, thin over
`jaxmr.serving`."""
