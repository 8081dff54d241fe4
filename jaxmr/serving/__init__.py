"""The search server (`jaxmr serve`): a Litestar app (`app`) over the engine (`engine`: micro-batched encoding and
search), with upload checks (`uploads`), the UI's views (`views`), settings and Prometheus metrics (`telemetry`).
It imports no training code."""
