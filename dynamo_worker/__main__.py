"""``python -m dynamo_worker`` is the ``dynamo-worker`` command."""

from dynamo_worker.cli import main

main()
