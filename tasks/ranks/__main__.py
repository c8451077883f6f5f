"""``python -m tasks.ranks ROOT RUN``: one training rank (see tasks/ranks/__init__.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from storage import fs
from storage.layout import Root
from tasks.config import config_from_yaml_text
from tasks.ranks.distributed import RankEnv
from tasks.ranks.trainer import Trainer


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when its launcher dies. torchrun starts ranks in sessions of their own, so
    without this a killed launcher leaves ranks training (and committing) unsupervised beside a re-run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before prctl took effect
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ranks", description="One training rank of a dumo run.")
    # Positional: launchers read option-like words after the module name as abbreviations of their own
    parser.add_argument("root", help="storage root URL of the run")
    parser.add_argument("run", help="run name (<root>/runs/<run>/config.yaml must exist)")
    args = parser.parse_args(argv)
    _die_with_parent()
    env = RankEnv.from_environ()
    sys.stdout.reconfigure(line_buffering=True)
    trainer = None
    try:
        layout = Root(args.root).run(args.run)
        config_yaml = fs.read_text(layout.config)  # read once: parsed here, carried into each checkpoint as is
        cfg = config_from_yaml_text(config_yaml)
        os.environ.setdefault("DS_ACCELERATOR", cfg.train.device)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the trainer's
        trainer = Trainer(cfg, config_yaml, layout, env)
        trainer.run()
    except BaseException:
        if os.environ.get("DUMO_ERROR_DIR"):  # the parent quotes the first failing rank's traceback
            os.makedirs(os.environ["DUMO_ERROR_DIR"], exist_ok=True)
            with open(os.path.join(os.environ["DUMO_ERROR_DIR"], f"rank-{env.rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
        raise
    finally:
        if trainer is not None:
            trainer.dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
