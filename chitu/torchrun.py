"""torchrun, quiet about what its ranks already reported: `python -m chitu.torchrun <torchrun's arguments>`.

torchrun answers a rank that exits with an error (a configuration error stops every rank, each printing its
one line) with a ChildFailedError traceback, and a SIGTERM or Ctrl-C with a SignalException traceback after
its workers have stopped. This runs torchrun's own launcher and turns those two into one line and an exit
code: the failed rank's, and 0 for a service stopped by SIGTERM or SIGINT (as the service exits alone)."""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"chitu.torchrun: rank {rank} stopped with {how} (its output above says why)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:
        if e.sigval in STOP_SIGNALS:
            return 0
        print(f"chitu.torchrun: stopped by signal {signal.Signals(e.sigval).name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
