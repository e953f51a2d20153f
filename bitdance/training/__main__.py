"""``python -m bitdance.training TASK ...`` (alone or under torchrun) is ``bitdance train TASK ...``."""

from bitdance.training.trainer import main

raise SystemExit(main())
