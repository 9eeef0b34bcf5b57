"""Training: the population engine (``engine``), one training job (``job``), a network's
identity (``recipe``), config checks (``checks``), optimizers and schedules by name (``optim``)
and sweep progress (``progress``)."""
