"""``python -m dynamo_worker.core.role_process ARGS``: the ``dynamo-worker`` command as ``up`` starts it.

Not ``python -m dynamo_worker``: in the processes multiprocessing's spawn method starts (vLLM's
engine core), spawn does not import a main module named ``*.__main__``, so the package's
``die_with_parent`` (``dynamo_worker/__init__.py``) would never run there and the engine core of a
SIGKILLed worker would live on. Under this name spawn imports the module, and so the package,
first (as ``__mp_main__``: the guard below keeps the command from running again).
"""

if __name__ == "__main__":
    from dynamo_worker.cli import main

    main()
