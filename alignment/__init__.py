"""alignkit's engine: recipe schema, pipeline, models, data, stages, rollouts."""
import logging

# bitsandbytes logs a warning on every CPU import about an optional `kernels` package; noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
