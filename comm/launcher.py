"""``python -m comm.launcher``: torchrun (same arguments), but a stop by signal is an exit status.

torchrun answers SIGTERM or SIGINT by passing the signal to every worker, waiting for them to exit
(up to 30 s, then SIGKILL) and raising an exception out of its main function, which prints a
traceback; a failed rank also ends it with a traceback. Servers started by ``launch.sh serve``
drain on SIGTERM; their launcher should end with one line and the conventional status 128 +
signal instead, and a failed rank with torchrun's summary of the failure and status 1.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"ringleader: launcher stopped by {e.sigval.name}; every rank has exited", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # the ranks have said what went wrong on stderr; this is torchrun's summary of who failed
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
