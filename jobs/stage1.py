"""Stage 1 on Ray Train: `ray job submit --working-dir . -- python jobs/stage1.py --config configs/tiny.yaml`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import job_parser, load, run_job  # noqa: E402


def main(args) -> int:
    from jobs.train_stage import run_stage

    run_stage(1, load(args), args.address)
    return 0


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
