"""Training: the population engine (``engine``), one training job (``job``), a network's
identity (``recipe``), config checks (``checks``) and sweep progress (``progress``)."""
