"""The training rank processes: ``python -m tasks.ranks ROOT RUN``, started N times by tasks.train (or by
torchrun or the deepspeed launcher on each node). No Prefect in here.

Each rank reads the resolved config from ``runs/<run>/config.yaml``, trains with DeepSpeed ZeRO from the latent
store and writes committed checkpoints under the run; started again, it continues from the newest intact one.
The parent learns what happened from storage, not from the ranks' output: losses from the train log
(``runs/<run>/train-log.jsonl``), checkpoints from their commit markers, this attempt's speed from the marker
of the last one. What rank 0 prints on stdout is for people (the parent logs it as progress).

    distributed.py  the distributed side: rank and device, process group, who speaks, checkpoint collectives
    trainer.py      the training loop (Trainer.run), the same on every rank
    report.py       rank 0's train log, step lines, progress bar and loss curve
    __main__.py     the entry point

Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by tasks.train, torchrun or the
deepspeed launcher); DUMO_STAGING_DIR (node-local scratch, default under the temp dir); DUMO_ERROR_DIR (a
failing rank writes its traceback there, for the parent to quote); DUMO_NO_PROGRESS (no tqdm bar);
DUMO_BATCH_TRACE (a directory: each rank saves the batch it trains on at each step there, for tests that
check which batches a resumed or re-sized run saw; small runs only).
"""
