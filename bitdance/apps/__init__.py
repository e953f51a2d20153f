"""What a user runs: the ``bitdance`` command (:mod:`.cli`, its commands in :mod:`.commands` and
:mod:`.eval_commands`), the benchmark (:mod:`.bench`), the demo (:mod:`.demo`) and the studio
(:mod:`.studio`, jobs in :mod:`.studio_jobs`, page in ``static/``)."""
